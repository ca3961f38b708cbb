"""Reading weight files of every format, by tensor name: the one reader that
`trainer --init` and every `merge` command share.

`sources.open_source(path)` opens a run, init, checkpoint or merge directory,
a `.keras`, `.weights.h5` or legacy `.h5` file, or a TensorFlow checkpoint
prefix, written by Keras 2 or Keras 3; `naming` gives every tensor one name;
`keras2` restates Keras 2 configs for Keras 3; `topology` pairs the layers of
two configs by their place in the graph; `weights` copies a source into a
live model.
"""
