"""fixes.py: the swap rule, the adaptive plan and the modes, on hand-written pairs."""
import pytest

from minispin.study.fixes import adaptive_plan, apply_fixes, pair_margin, relabel, swaps


def scored(pid, real, gen, **extra):
    return {"id": pid, "scores": {"real": real, "generated": gen}, **extra}


def test_margin_and_swap_rule_at_the_threshold():
    assert pair_margin(scored("a", 50, 55)) == 5
    assert pair_margin(scored("b", None, 55)) is None
    assert pair_margin({"id": "c", "margin": 30}) is None      # a stale "margin" field is not a score
    assert pair_margin(scored("d", True, 55)) is None          # booleans are not scores
    assert swaps(5, 5) and not swaps(4.9, 5) and swaps(0, 0) and not swaps(None, 0)
    out, s = relabel([scored("a", 50, 55), scored("b", 50, 54), scored("t", 50, 50),
                      scored("u", None, 99, swap=True)], threshold=5)
    assert [p["swap"] for p in out] == [True, False, False, False]   # unscored: never swapped
    assert [p["margin"] for p in out] == [5, 4, 0, None]
    assert (s["swapped"], s["judged"], s["unscored"]) == (1, 3, 1)
    out0, _ = relabel(out, threshold=0)
    assert [p["swap"] for p in out0] == [True, True, True, False]    # τ = 0: ties swap (the study)


def test_adaptive_plan_only_small_margins_get_noise():
    pairs = [scored("big+", 40, 60), scored("at", 50, 55), scored("below", 50, 54),
             scored("zero", 50, 50), scored("neg-small", 54, 50), scored("neg-at", 55, 50),
             scored("big-", 90, 10), scored("unparsable", None, 70, swap=True)]
    out, s = adaptive_plan(pairs, threshold=5, sigma=0.5)
    got = {p["id"]: (p["swap"], p["noise"]) for p in out}
    assert got == {"big+": (True, 0.0), "at": (True, 0.0), "below": (False, 0.5), "zero": (False, 0.5),
                   "neg-small": (False, 0.5), "neg-at": (False, 0.0), "big-": (False, 0.0),
                   "unparsable": (False, 0.5)}
    assert s == {"pairs": 8, "threshold": 5, "sigma": 0.5, "decided": 4, "swapped": 2, "kept": 2,
                 "noised": 4, "unscored": 1}
    assert "noise" not in pairs[0] and pairs[7]["swap"] is True  # pure: inputs untouched
    out0, _ = adaptive_plan(pairs, threshold=0, sigma=0.5)       # τ 0: the judge decides all scored
    assert [p["noise"] for p in out0] == [0.0] * 7 + [0.5]
    assert {p["id"] for p in out0 if p["swap"]} == {"big+", "at", "below", "zero"}


def test_apply_fixes_modes():
    judged = [scored("a", 10, 40, swap=True), scored("b", 50, 52), scored("c", None, 52),
              scored("d", 50, 45, noise=0.9)]
    sw = lambda ps: [p["swap"] for p in ps]  # noqa: E731
    nz = lambda ps: [p.get("noise", 0.0) for p in ps]  # noqa: E731
    plain, s = apply_fixes(judged)
    assert plain == judged and s["mode"] == "plain"            # as read: its own fields honoured
    rel, s = apply_fixes(judged, relabel_pairs=True, threshold=5)
    assert sw(rel) == [True, False, False, False] and nz(rel) == [0.0] * 4 and s["swapped"] == 1
    rel0, _ = apply_fixes(judged, relabel_pairs=True, threshold=0)
    assert sw(rel0) == [True, True, False, False]
    noi, s = apply_fixes(judged, ref_sigma=0.5)
    assert sw(noi) == [False] * 4 and nz(noi) == [0.5] * 4 and s["mode"] == "noise"
    both, s = apply_fixes(judged, relabel_pairs=True, ref_sigma=0.5)
    assert sw(both) == [True, False, False, False] and nz(both) == [0.5] * 4 and s["mode"] == "relabel+noise"
    ada, s = apply_fixes(judged, adaptive=True, threshold=5, adaptive_sigma=0.25)
    assert sw(ada) == [True, False, False, False] and nz(ada) == [0.0, 0.25, 0.25, 0.0]
    assert s["mode"] == "adaptive" and s["noised"] == 2
    unjudged = [{"id": "x", "real": "r", "generated": "g"}]
    with pytest.raises(ValueError, match="judge"):
        apply_fixes(unjudged, relabel_pairs=True)
