"""`merge auto`: plain average, align-then-average, or ensemble, decided by
the measured loss barrier between the two models."""
from __future__ import annotations

from .barrier import barrier

# A barrier up to this fraction of the ends' mean loss counts as "the line
# between them stays good": averaging there keeps most of both models.
LOW = 0.5


def decide(res: dict) -> tuple[str, str]:
    rows = res["curves"]["naive"]
    ends = (rows[0]["loss"] + rows[-1]["loss"]) / 2
    naive, aligned = res["barrier"]["naive"], res["barrier"].get("aligned")
    if naive <= LOW * ends:
        return "average", (f"the straight line from A to B has a loss barrier of {naive:.3f}, at most {LOW:g} x "
                           f"the ends' mean loss {ends:.3f}: their plain average stays good")
    if aligned is not None and aligned <= LOW * ends:
        return "align", (f"the straight line has a loss barrier of {naive:.3f}, but after aligning B's units to "
                         f"A's only {aligned:.3f} (ends' mean loss {ends:.3f}): average after alignment")
    return "ensemble", (f"loss barrier {naive:.3f} before and {aligned:.3f} after alignment, both above {LOW:g} x "
                        f"the ends' mean loss {ends:.3f}: no good average exists, combine their predictions")


def auto(a: str, b: str, data: str, out: str, data_dir=None, overwrite: bool = False,
         recorded: bool = False) -> dict:
    from trainer.errors import UsageError

    from .output import check_output
    if not out.endswith(".keras"):
        raise UsageError(f"-o {out}: auto writes a .keras file; end the name with .keras")
    check_output(out, [a, b], overwrite)
    res = barrier(a, b, data, data_dir, recorded=recorded)
    choice, why = decide(res)
    if choice == "ensemble":
        from .ensemble import write_ensemble
        write_ensemble([a, b], out, "mean", None, overwrite)
    else:
        from .fedavg import Options, fedavg
        o = Options(inputs=[a, b], out=out, force=True, uniform=True, align=choice == "align", overwrite=overwrite,
                    quiet=True)
        fedavg(o)
    return {"choice": choice, "why": why, "barrier": res["barrier"], "out": out, "data": data}
