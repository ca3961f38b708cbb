"""Layers matched by their place in the graph, from two model configs (JSON only).

Keras names a layer it was not given a name for by its class and a counter
that runs for the whole Python session (`dense`, `dense_1`, ...): the same
architecture saved from two sessions has different names, and two models
whose names were given in another order have the same names on different
layers. `match(a, b)` pairs the layers of two configs by their place in the
graph instead: outputs with outputs, then each layer's inputs with the other's,
back to the model inputs (a Sequential is read as the chain it is). Two layers
pair only if they are of the same class with the same options (names,
initializers and build shapes aside); every layer must pair. The result maps
every layer's name path in `b` to the one in `a`, nested models included, in
the form trainer.files.naming.KerasNames uses (`outer/inner`).
"""
from __future__ import annotations

import json

_MODELS = {"Functional", "Sequential", "Model"}
# Options that do not change what a trained layer computes: identity, how its
# weights were first drawn, what shape it was first built for (the tensors'
# shapes are compared separately, after matching).
_IGNORED = {"name", "trainable", "build_config", "seed"}


class Mismatch(Exception):
    """The two configs are not the same graph; str() says where."""


def match(a: dict, b: dict) -> dict[str, str]:
    """{name path in b: name path in a} for every layer; Mismatch if the graphs differ."""
    out: dict[str, str] = {}
    try:
        _model(_inner(a), _inner(b), "", "", out)
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:  # a config not as Keras writes it
        raise Mismatch(f"a config that cannot be read as a layer graph ({type(e).__name__}: {e})") from None
    return out


def renames(mapping: dict[str, str]) -> dict[str, str]:
    """The pairs of `mapping` whose names differ."""
    return {b: a for b, a in mapping.items() if a != b}


def key_renames(keys, mapping: dict[str, str], family: str) -> dict[str, str]:
    """{key: the key with `mapping`'s layer names} for a Source's keys (see
    trainer.files.naming for the two families)."""
    if family == "keras":
        # "<layer name path>/[...]/i": the longest path that prefixes a key is
        # its layer (a nested model's layers win over the model).
        ordered = sorted(mapping, key=len, reverse=True)

        def new(key):
            old = next((p for p in ordered if key.startswith(p + "/")), None)
            return key if old is None else mapping[old] + key[len(old):]
    else:
        # Variable keys start at the innermost layer ("dense_3/kernel",
        # "lstm/lstm_cell/kernel"): a nested model's layers carry no prefix,
        # so only names that are unambiguous without their path are renamed.
        flat: dict[str, set] = {}
        for old, to in mapping.items():
            flat.setdefault(old.rsplit("/", 1)[-1], set()).add(to.rsplit("/", 1)[-1])
        unique = {old: next(iter(to)) for old, to in flat.items() if len(to) == 1}

        def new(key):
            *layers, last = key.split("/")
            return "/".join([unique.get(p, p) for p in layers] + [last])
    return {k: new(k) for k in keys}


def _inner(entry) -> dict:
    cfg = entry.get("config") if isinstance(entry, dict) else None
    return cfg if isinstance(cfg, dict) else {}


def _name(layer: dict) -> str:
    return layer.get("name") or _inner(layer).get("name") or "?"


def _model(a: dict, b: dict, pa: str, pb: str, out: dict) -> None:
    layers_a, layers_b = a.get("layers") or [], b.get("layers") or []
    if len(layers_a) != len(layers_b):
        where = f" in {pa.rstrip('/')!r}" if pa else ""
        raise Mismatch(f"{len(layers_a)} layers{where} against {len(layers_b)}")
    if "output_layers" in a or "output_layers" in b:
        pairs = _graph_pairs(_as_graph(a), _as_graph(b))
    else:  # two Sequentials: the list is the graph
        pairs = list(zip(layers_a, layers_b))
    order = {_name(l): i for i, l in enumerate(layers_b)}
    pairs.sort(key=lambda pair: order.get(_name(pair[1]), 0))
    for la, lb in pairs:
        _layer(la, lb, pa, pb, out)


def _as_graph(cfg: dict) -> dict:
    """A Sequential's config as a functional one's (each layer called on the
    previous one's output), so that it pairs with a functional model of the
    same chain."""
    if "output_layers" in cfg:
        return cfg
    layers = cfg.get("layers") or []
    names = [_name(l) for l in layers]
    chained = [{**layer, "inbound_nodes": [[[prev, 0, 0, {}]]] if prev else []}
               for layer, prev in zip(layers, [None] + names[:-1])]
    return {**cfg, "layers": chained, "input_layers": [names[0], 0, 0] if names else [],
            "output_layers": [names[-1], 0, 0] if names else []}


def _graph_pairs(a: dict, b: dict) -> list[tuple[dict, dict]]:
    layers_a, layers_b = a.get("layers") or [], b.get("layers") or []
    by_a = {_name(l): l for l in layers_a}
    by_b = {_name(l): l for l in layers_b}
    todo = []
    for key in ("output_layers", "input_layers"):
        ra, rb = _refs_of(a.get(key)), _refs_of(b.get(key))
        if len(ra) != len(rb):
            raise Mismatch(f"{len(ra)} {key.split('_')[0]}s against {len(rb)}")
        todo += zip(ra, rb)
    paired_b: dict[str, str] = {}
    paired_a: set[str] = set()
    pairs = []
    while todo:
        (na, *ia), (nb, *ib) = todo.pop()
        if ia != ib:
            raise Mismatch(f"layer {na!r} feeds its node/output {ia} where {nb!r} feeds {ib}")
        if nb in paired_b:
            if paired_b[nb] != na:
                raise Mismatch(f"layer {nb!r} sits where {paired_b[nb]!r} and {na!r} do")
            continue
        if na in paired_a or na not in by_a or nb not in by_b:
            raise Mismatch(f"layer {na!r} and layer {nb!r} are at different places")
        paired_b[nb] = na
        paired_a.add(na)
        la, lb = by_a[na], by_b[nb]
        pairs.append((la, lb))
        nodes_a, nodes_b = la.get("inbound_nodes") or [], lb.get("inbound_nodes") or []
        if len(nodes_a) != len(nodes_b):
            raise Mismatch(f"layer {na!r} is called {len(nodes_a)} times, {nb!r} {len(nodes_b)}")
        for node_a, node_b in zip(nodes_a, nodes_b):
            (sa, ra), (sb, rb) = _node(node_a), _node(node_b)
            if sa != sb or len(ra) != len(rb):
                raise Mismatch(f"layer {na!r} and layer {nb!r} are called differently")
            todo += zip(ra, rb)
    if len(pairs) != len(layers_a):
        raise Mismatch("some layers lie outside the paths from inputs to outputs")
    return pairs


def _layer(la: dict, lb: dict, pa: str, pb: str, out: dict) -> None:
    na, nb = _name(la), _name(lb)
    if la.get("class_name") != lb.get("class_name"):
        raise Mismatch(f"layer {pa + na!r} is a {la.get('class_name')}, {pb + nb!r} a {lb.get('class_name')}")
    out[pb + nb] = pa + na
    ca, cb = _inner(la), _inner(lb)
    if la.get("class_name") in _MODELS or "layers" in ca:
        _model(ca, cb, f"{pa}{na}/", f"{pb}{nb}/", out)
        return
    for key in sorted(set(ca) & set(cb)):
        va, vb = ca[key], cb[key]
        if _is_model(va) and _is_model(vb):  # a wrapper around a model: its layers are named below it
            _model(_inner(va), _inner(vb), f"{pa}{na}/{key}/", f"{pb}{nb}/{key}/", out)
        elif key not in _IGNORED and not key.endswith("_initializer") and _norm(va) != _norm(vb):
            raise Mismatch(f"layer {pa + na!r} has {key}={_show(va)}, {pb + nb!r} has {_show(vb)}")


def _is_model(value) -> bool:
    return isinstance(value, dict) and value.get("class_name") in _MODELS and isinstance(value.get("config"), dict)


def _norm(value):
    """A value as comparable across Keras 2 and 3: dtype policies as their
    name, no module paths or None-valued options, and a layer nested in the
    value (a wrapper's) without the options `_layer` ignores."""
    if isinstance(value, dict):
        if value.get("class_name") in ("DTypePolicy", "Policy") and isinstance(value.get("config"), dict):
            return value["config"].get("name")
        out = {k: _norm(v) for k, v in value.items() if v is not None and k not in ("module", "registered_name")}
        if isinstance(value.get("config"), dict) and "trainable" in value["config"]:  # a serialized layer
            out["config"] = {k: v for k, v in out["config"].items()
                             if k not in _IGNORED and not k.endswith("_initializer")}
        return out
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def _show(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _refs_of(value) -> list[tuple]:
    """[(layer, node, tensor)] of input_layers/output_layers, one tensor or a list."""
    if isinstance(value, list) and len(value) == 3 and isinstance(value[0], str):
        return [tuple(value)]
    if isinstance(value, list):
        return [r for v in value for r in _refs_of(v)]
    if isinstance(value, dict):
        return [r for k in sorted(value) for r in _refs_of(value[k])]
    return []


def _node(node) -> tuple[str, list[tuple]]:
    """(how a layer is called, with its input tensors as "@"; the tensors'
    (layer, node, tensor) references), for Keras 3's {"args", "kwargs"}
    nodes and Keras 2's [[layer, node, tensor, kwargs], ...] alike."""
    refs: list[tuple] = []
    if isinstance(node, list):  # Keras 2
        kwargs = {}
        for ref in node:
            refs.append(tuple(ref[:3]))
            if len(ref) > 3 and isinstance(ref[3], dict):
                kwargs.update(ref[3])
        args = ["@"] if len(refs) == 1 else [["@"] * len(refs)]
        return json.dumps([args, _drop_none(kwargs)], sort_keys=True), refs

    def strip(value):
        if isinstance(value, dict):
            if value.get("class_name") == "__keras_tensor__":
                refs.append(tuple((value.get("config") or {}).get("keras_history") or ("?", 0, 0)))
                return "@"
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    args = strip(node.get("args", []) if isinstance(node, dict) else [])
    kwargs = strip(node.get("kwargs", {}) if isinstance(node, dict) else {})
    return json.dumps([args, _drop_none(kwargs)], sort_keys=True, default=str), refs


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None} if isinstance(d, dict) else d
