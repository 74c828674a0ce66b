"""`fastprompt plot` and `fastprompt compare` on generated metrics files (no training): 1, 3 and 12 runs, the
colours checked on the matplotlib artists (one per run, distinct, the same in every panel), the split styles,
the legend outside the axes, the formats; compare's steps and seconds to a target on known curves."""

import json
import math
import os

import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from fastprompt import cli
from fastprompt.train.compare import compare_runs, format_comparison
from fastprompt.train.plot import make_figure, moving_average, run_colours

METHODS = ["coop", "cocoop", "maple", "dcp", "dpt", "map_dafe", "tmml", "ivlp", "vpt_deep", "coop", "dcp", "dpt"]


def write_run(folder, method="coop", base_to_new=False, steps=30, steps_per_epoch=10, seconds_per_step=0.5,
              top1=None, model="ViT-B-16", data="/data/dtd"):
    """A metrics.jsonl as the trainer writes it: a run record, a step record per step (a falling, noisy loss),
    an eval record per epoch with the top-1 values given (or rising ones)."""
    os.makedirs(folder, exist_ok=True)
    epochs = steps // steps_per_epoch
    top1 = top1 or [40.0 + 10 * e for e in range(epochs)]
    records = [{"kind": "run", "config": {"method": method, "model": model, "pretrained": "openai", "data": data}}]
    for s in range(1, steps + 1):
        records.append({"kind": "step", "step": s, "epoch": (s - 1) // steps_per_epoch + 1,
                        "loss": 2.0 / s + 0.1 * (s % 3), "accuracy": 50.0, "lr": 0.002 * (1 - s / steps),
                        "images_per_s": 100.0 + (s % 5), "wall_s": s * seconds_per_step})
        if s % steps_per_epoch == 0:
            value = top1[s // steps_per_epoch - 1]
            if base_to_new:
                hm = 2 * value * (value - 10) / (2 * value - 10)
                evaluation = {"top1_base": value, "top1_new": value - 10, "hm": hm}
            else:
                evaluation = {"top1_test": value}
            records.append({"kind": "eval", "step": s, "epoch": s // steps_per_epoch,
                            "wall_s": s * seconds_per_step + 0.25, **evaluation})
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(folder)


def runs_of(tmp_path, n, base_to_new=True):
    return [write_run(tmp_path / f"{METHODS[i]}-{i}", METHODS[i], base_to_new=base_to_new and i % 2 == 0)
            for i in range(n)]


def lines_by_run(fig):
    """{run index: {(panel, quantity, kind): Line2D}} from the gids make_figure gives its curves."""
    out = {}
    for panel, ax in enumerate(fig.axes):
        for line in ax.get_lines():
            run, quantity, kind = line.get_gid().split(":")
            out.setdefault(int(run), {})[(panel, quantity, kind)] = line
    return out


@pytest.mark.parametrize("n", [1, 3, 12])
def test_one_colour_per_run_kept_across_panels_and_the_legend_outside(tmp_path, n):
    fig = make_figure(runs_of(tmp_path, n), smooth=5)
    by_run = lines_by_run(fig)
    assert sorted(by_run) == list(range(n))
    colours = []
    for run, lines in by_run.items():
        opaque = {to_rgba(line.get_color(), 1) for line in lines.values()}
        assert len(opaque) == 1, (run, opaque)  # one colour in every panel, raw and smoothed alike
        colours.append(opaque.pop())
        panels = {panel for panel, _, _ in lines}
        assert panels == {0, 1, 2, 3}  # loss and top-1, against steps and against seconds
    assert len(set(colours)) == n  # distinct runs, distinct colours
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = fig.legends
    assert len(legends) == 2 and [lg.get_title().get_text() for lg in legends] == ["runs", "evaluation"]
    assert len(legends[0].get_texts()) == n
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), "the legend covers a panel"
        assert box.x1 <= fig.bbox.x1 + 1 and box.y0 >= -1  # inside the figure
    a, b = (lg.get_window_extent(renderer) for lg in legends)
    assert not a.overlaps(b)
    assert fig._suptitle.get_text() == "ViT-B-16 (openai) on /data/dtd"  # what every run shares
    assert fig.axes[0].get_xlabel() == "training step" and fig.axes[1].get_xlabel() == "wall-clock time (s)"
    assert fig.axes[2].get_ylabel() == "top-1 accuracy (%)"


def test_split_styles_markers_and_smoothing(tmp_path):
    paths = runs_of(tmp_path, 2)  # run 0 base-to-new, run 1 test only
    fig = make_figure(paths, smooth=4)
    by_run = lines_by_run(fig)
    styles = {kind: (line.get_linestyle(), line.get_marker()) for (panel, q, kind), line in
              {**by_run[0], **by_run[1]}.items() if q == "top1"}
    assert styles == {"test": ("-", "o"), "base": ("--", "s"), "new": (":", "^"), "hm": ("-.", "D")}
    assert len(set(styles.values())) == 4
    raw, smoothed = by_run[0][(0, "loss", "raw")], by_run[0][(0, "loss", "smoothed")]
    assert raw.get_alpha() < 0.5 and smoothed.get_alpha() in (None, 1)  # raw values faint behind
    assert list(smoothed.get_ydata()) == pytest.approx(moving_average(list(raw.get_ydata()), 4))
    assert list(by_run[0][(2, "top1", "hm")].get_xdata()) == [10, 20, 30]  # a marker at each evaluation
    assert list(by_run[0][(3, "top1", "hm")].get_xdata()) == [5.25, 10.25, 15.25]
    assert [t.get_text() for t in fig.legends[1].get_texts()] == ["base", "new", "HM", "test"]
    unsmoothed = lines_by_run(make_figure(paths))[0]
    assert (0, "loss", "smoothed") not in unsmoothed and unsmoothed[(0, "loss", "raw")].get_alpha() in (None, 1)


def test_moving_average_is_trailing():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([4.0, 8.0], 1) == [4.0, 8.0]


@pytest.mark.parametrize("metric, label", [("loss", "training loss"), ("top1", "top-1 accuracy (%)"),
                                           ("lr", "learning rate (first group)"), ("images_per_s",
                                                                                  "throughput (images/s)")])
def test_one_metric_alone(tmp_path, metric, label):
    fig = make_figure(runs_of(tmp_path, 2), metric=metric, smooth=3)
    assert len(fig.axes) == 2 and fig.axes[0].get_ylabel().startswith(label)
    quantities = {q for lines in lines_by_run(fig).values() for _, q, _ in lines}
    assert quantities == {metric}
    kinds = {k for lines in lines_by_run(fig).values() for _, _, k in lines}
    if metric == "lr":
        assert kinds == {"raw"}  # a schedule is not smoothed


def test_no_shared_title_when_the_runs_differ(tmp_path):
    a = write_run(tmp_path / "a", model="ViT-B-16")
    b = write_run(tmp_path / "b", model="ViT-L-14")
    assert make_figure([a, b])._suptitle is None


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_the_output_format_follows_the_suffix(tmp_path, suffix, magic, capsys):
    out = str(tmp_path / "plots" / f"convergence{suffix}")
    assert cli.main(["plot", *runs_of(tmp_path, 3), "--output", out, "--smooth", "5"]) == 0
    with open(out, "rb") as f:
        assert f.read(5).startswith(magic)
    if suffix == ".png":
        with Image.open(out) as image:
            assert image.size[0] > 1000
    assert capsys.readouterr().out.strip() == out


# ---- compare -------------------------------------------------------------------------------------------

def test_compare_gives_the_known_steps_and_seconds_to_target(tmp_path):
    fast = write_run(tmp_path / "fast", "dcp", top1=[55.0, 71.0, 80.0], seconds_per_step=1.0)
    slow = write_run(tmp_path / "slow", "coop", top1=[50.0, 65.0, 70.5], seconds_per_step=0.5)
    never = write_run(tmp_path / "never", "maple", top1=[30.0, 40.0, 45.0])
    rows = {r["run"]: r for r in compare_runs([fast, slow, never], target=70)}
    assert (rows["fast"]["steps_to_target"], rows["fast"]["seconds_to_target"]) == (20, 20.25)
    assert (rows["slow"]["steps_to_target"], rows["slow"]["seconds_to_target"]) == (30, 15.25)
    assert rows["never"]["steps_to_target"] is None and rows["never"]["seconds_to_target"] is None
    assert rows["fast"]["final"] == {"test": 80.0} and rows["slow"]["best"] == {"test": 70.5}
    assert rows["fast"]["images_per_s"] == 102.0 and rows["fast"]["steps"] == 30
    assert rows["fast"]["seconds"] == 30.25  # the clock at the last record (the final evaluation)
    table = format_comparison(list(rows.values()))
    assert "| fast | dcp | 80.00 | 80.00 | 20 | 20.2 | 102.0 | 30 | 30.2 |" in table
    assert "| never | maple | 45.00 | 45.00 | not reached | not reached |" in table
    assert "target: top-1 70.00% on test" in table


def test_compare_reads_hm_by_default_and_targets_what_every_run_reached(tmp_path):
    b2n = write_run(tmp_path / "b2n", "dcp", base_to_new=True, top1=[60.0, 70.0, 75.0])
    other = write_run(tmp_path / "other", "coop", base_to_new=True, top1=[70.0, 80.0, 82.0])
    rows = compare_runs([b2n, other])
    hm_best = [max(2 * v * (v - 10) / (2 * v - 10) for v in values) for values in ([60, 70, 75], [70, 80, 82])]
    assert rows[0]["target"] == pytest.approx(min(hm_best)) and rows[0]["target_split"] == "hm"
    assert rows[0]["steps_to_target"] == 30 and rows[1]["steps_to_target"] == 20  # HM 69.6 / 74.7 at step 20
    assert set(rows[0]["final"]) == {"base", "new", "hm"}
    assert compare_runs([b2n], target=60, split="base")[0]["steps_to_target"] == 10
    assert compare_runs([b2n], target=60, split="test")[0]["target_split"] is None
    table = format_comparison(rows)
    assert table.splitlines()[0].startswith("| run | method | final base | final new | final HM | best base |")


def test_compare_command(tmp_path, capsys):
    runs = [write_run(tmp_path / "a", "dcp", top1=[55.0, 71.0, 80.0])]
    assert cli.main(["compare", *runs, "--target", "70"]) == 0
    assert "steps to 70.0%" in capsys.readouterr().out
    assert cli.main(["compare", *runs, "--target", "70", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["steps_to_target"] == 20


def test_run_colours_are_distinct_up_to_many_runs():
    for n in (1, 10, 11, 12, 20, 25):
        colours = run_colours(n)
        assert len(colours) == n and len({tuple(round(c, 4) for c in colour) for colour in colours}) == n
    assert not any(math.isnan(c) for c in run_colours(3)[0])
