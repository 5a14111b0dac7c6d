"""The docs say what runs: figures the README quotes come from the files benches write, and
messages name the setting of the command the user ran."""

import importlib.util
import json
import re

from conftest import ROOT


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quickstart_section(readme: str) -> str:
    return readme[readme.index("## Quickstart"):readme.index("## Train on your own images")]


def test_the_readme_quickstart_figures_are_the_results_file():
    quickstart = _bench("quickstart")
    results = json.loads(quickstart.RESULTS.read_text())
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(quickstart.BLOCK_START), readme.index(quickstart.BLOCK_END)
    assert readme[start:end + len(quickstart.BLOCK_END)] == quickstart.readme_block(results), \
        "README's quickstart block differs from bench/results/quickstart.json: run python bench/quickstart.py --readme-only"
    assert results["runs"] and all(run["num_samples"] == 4096 for run in results["runs"])


def test_the_quickstart_section_quotes_no_figure_outside_the_block():
    """Outside the generated block, only the bar's own thresholds may appear as percentages:
    a measured figure copied by hand is how the docs drifted before."""
    quickstart, quality = _bench("quickstart"), _bench("digits_quality")
    section = _quickstart_section((ROOT / "README.md").read_text())
    start, end = section.index(quickstart.BLOCK_START), section.index(quickstart.BLOCK_END)
    outside = section[:start] + section[end:]
    thresholds = {f"{quality.CONFIDENCE:.0%}", f"{quality.MIN_SHARE:.0%}", f"{quality.MAX_SHARE:.0%}"}
    percentages = set(re.findall(r"\d+(?:\.\d+)?%", outside))
    assert percentages <= thresholds, f"figures outside the generated block: {percentages - thresholds}"
    # Nor a measured time or speed of the quickstart's run (the test suite's own timing follows it).
    about_the_run = outside[:outside.index("The second command")]
    timings = re.findall(r"\d[\d,.]*\s*(?:s|min|img/s)\b|\d+:\d\d", about_the_run)
    assert not timings, f"timings outside the generated block: {timings}"


def test_the_readme_block_renders_every_run():
    quickstart = _bench("quickstart")
    run = {"train_s": 61.0, "wall_s": 70.0, "img_per_s_last": 9876, "confident": 0.9441, "smallest_class": 0.081,
           "largest_class": 0.128, "diversity": 0.78, "verdict": True, "held_out_confident": 0.928, "num_samples": 4096}
    block = quickstart.readme_block({"date": "2026-12-07", "commit": "abc", "machine": "2 cores",
                                     "runs": [run, {**run, "confident": 0.5, "verdict": False}]})
    assert "| 1 | 94.4% | 8.1%-12.8% | 0.78 | yes |" in block and "| 2 | 50.0% |" in block and "| NO |" in block
    assert "61 s, 61 s" in block and "9,876 img/s" in block


def test_a_training_run_names_the_config_key_for_torchvision_files(train_main, tmp_path):
    """Training takes data.root, not prepare's --root flag."""
    code, _, err = train_main("--config", str(ROOT / "configs" / "tiny.yaml"), "data.dataset=mnist")
    assert code == 2
    assert "pass data.root=DIR" in err and "--root" not in err
