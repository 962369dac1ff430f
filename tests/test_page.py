"""The leaderboard page and its figures, claimed against measured, and merging folders: what
the files hold (the browser test, tests/test_browser.py, checks how the page behaves)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from vlbench.cli import main
from vlbench.errors import UserError
from vlbench.reporting.leaderboard import record_command, write_leaderboard
from vlbench.schema import parse_claims

ROOT = Path(__file__).resolve().parent.parent


def cell(folder, defense, attack, dataset, correct, *, name=None, params=None, eps=None, modality="image",
         model="ViT-B-32", subset="s", versions=None, fit=None, seed=0, entry=None, weights="w1", attack_params=None):
    """A result cell in the format the runner writes (schema 3: with per-sample outcomes); with
    ``entry``, its base model as a model card entry (as cells record it since the card), else
    as an architecture and tag (as older cells do)."""
    label = f"{defense}__{attack}__{dataset}" + (f"__{entry}-{weights}" if entry else "")  # ids name the weights
    threat = {} if attack == "none" else {"modality": modality, **({"eps_255": eps} if eps is not None else {})}
    payload = {
        "schema": 3, "cell": label, "defense": defense, "attack": attack, "dataset": dataset,
        "task": "classification", "n": len(correct), "subset_hash": f"{subset}-{dataset}", "seed": seed,
        "precision": "fp32", "created": "2026-01-01T00:00:00+00:00", "code_revision": "abc",
        "metrics": {"top1": 100.0 * sum(correct) / len(correct)},
        "config": {**({"model": model, "pretrained": "openai"} if entry is None else {"model": {
                       "entry": entry, "arch": model, "tag": None, "source": f"hf-hub:org/{entry}", "format": "open_clip_hf",
                       "towers": "full", "weights": weights, "base": None}}),
                   "defense": {"name": name or defense, "version": "1", "params": params or {}},
                   "attack": {"name": attack.split("@")[0], "version": "1", "params": attack_params or {},
                              "threat_model": threat}},
        **({"base": {"entry": entry, "fingerprint": f"{weights}-loaded"}} if entry is not None else {}),
        "model": {"trained": fit is not None, **({"checkpoint": f"/cache/{defense}-0123.safetensors",
                                                  "fit": {"seconds": fit}} if fit is not None else {})},
        "versions": versions or {"vlbench": "0.1.0", "torch": "2.14.1", "open_clip": "3.3.0"},
        "samples": {"ids": list(range(len(correct))), "top1": "".join(map(str, correct))},
    }
    (folder / f"{label}.json").write_text(json.dumps(payload))


def ones(k, n=100):
    return [1] * k + [0] * (n - k)


@pytest.fixture
def board(tmp_path):
    """none and tecoa (declaring claims) × clean, autoattack at 1/255, a pgd sweep and a text
    attack, on two classification datasets."""
    folder = tmp_path / "results"
    folder.mkdir()
    for defense, clean, robust, kwargs in (("none", 60, 5, {}),
                                           ("tecoa", 45, 40, {"params": {"eps": 1.0}, "fit": 12.5})):
        for dataset in ("a", "b"):
            cell(folder, defense, "none", dataset, ones(clean), **kwargs)
            cell(folder, defense, "autoattack", dataset, ones(robust), eps=1.0, **kwargs)
            cell(folder, defense, "bert-attack", dataset, ones(clean - 3), modality="text", **kwargs)
            for eps in (1, 2, 4):
                cell(folder, defense, f"pgd@{eps}", dataset, ones(max(robust - 5 * eps, 0)), eps=float(eps), **kwargs)
    return folder


def test_the_page_is_self_contained_with_its_sections_and_figures(board):
    record_command(board, ["run", "matrix", "--config", "configs/x.yaml", "--out", str(board)])
    write_leaderboard(board)
    page = (board / "leaderboard.html").read_text()
    # offline: no external script, style, image or font
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page) and "@import" not in page
    assert page.count("<script>") == 1 and "<svg" in page
    for section in ("summary", "curves", "figures", "datasets", "defenses", "notes", "provenance"):
        assert f'id="{section}"' in page
    # ranked summary: sortable, best marked, rows link to their defense's section
    assert 'class="sortable"' in page and 'class="best"' in page
    assert 'href="#defense-tecoa"' in page and 'id="defense-tecoa"' in page
    # one collapsible table per dataset
    assert page.count("<details>") == 2
    # the figures: inline SVG and PNG files next to the page, linked from the Markdown
    names = sorted(p.stem for p in (board / "figures").glob("*.png"))
    assert names == ["attack-families", "clean-vs-robust", "curve-pgd"]
    for name in names:
        assert f'id="figure-{name}"' in page and (board / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"(figures/{name}.png)" in (board / "leaderboard.md").read_text()
    # provenance: the recorded command, revision, versions, subsets
    assert "vlbench run matrix --config configs/x.yaml" in page and "abc" in page and "s-a" in page
    # the training time and checkpoint key of the trained defense
    section = page.split('id="defense-tecoa"')[1]
    assert "12.5 s" in section and "tecoa-0123" in section


def test_figures_are_deterministic_and_stale_ones_are_removed(board):
    write_leaderboard(board)
    first = {p.name: p.read_bytes() for p in (board / "figures").glob("*.png")}
    page = (board / "leaderboard.html").read_text()
    write_leaderboard(board)
    assert first == {p.name: p.read_bytes() for p in (board / "figures").glob("*.png")}
    assert page == (board / "leaderboard.html").read_text()
    for path in board.glob("*pgd@*"):
        path.unlink()
    write_leaderboard(board)
    assert not (board / "figures" / "curve-pgd.png").exists()


def test_claims_sit_next_to_measured_numbers_and_flag_rows_below_them(board):
    """tecoa declares TeCoA¹'s ViT-B/32 numbers: clean 53.1 (measured 45 ± ~7: below), AutoAttack
    at 1/255 38.8 (measured 40: consistent), at 2 and 4/255 (no cells: not measured)."""
    write_leaderboard(board)
    page = (board / "leaderboard.html").read_text()
    section = page.split('id="defense-tecoa"')[1].split("</section>")[0]
    assert section.count("not measured") == 2 and "consistent" in section and "below claimed" in section
    assert "Schlarmann et al., ICML 2024" in section
    markdown = (board / "leaderboard.md").read_text()
    assert "| tecoa ⚑ below claimed" in markdown and "| none " in markdown
    # another model's cells do not measure a claim made for ViT-B-32
    for path in board.glob("*.json"):
        payload = json.loads(path.read_text())
        payload["config"]["model"] = "ViT-L-14"
        path.write_text(json.dumps(payload))
    write_leaderboard(board)
    section = (board / "leaderboard.html").read_text().split('id="defense-tecoa"')[1].split("</section>")[0]
    assert section.count("not measured") == 4 and "below claimed" not in section


@pytest.mark.parametrize("raw, problem", [
    ({"model": "m", "dataset": "a", "attack": "pgd", "eps": 1, "metric": "top1", "value": 3}, "lacks source"),
    ({"model": "m", "dataset": "a", "attack": "pgd", "eps": 1, "metric": "top1", "value": "x", "source": "T1"},
     "not a number"),
    ({"model": "m", "dataset": "a", "attack": "pgd", "eps": 1, "metric": "top1", "value": 3, "source": "T1",
      "table": 2}, "unknown keys table"),
])
def test_a_malformed_claim_is_a_one_line_user_error(raw, problem):
    with pytest.raises(UserError, match=problem):
        parse_claims([raw], "defense x")


def test_a_submission_record_adds_claims_and_the_paper_of_an_unregistered_defense(board):
    for dataset in ("a", "b"):
        cell(board, "mine", "none", dataset, ones(70), name="not-installed-here")
    card = {"name": "not-installed-here", "paper": "Someone et al., 2026", "claimed": [
        {"model": "ViT-B-32", "dataset": "a", "attack": "none", "eps": None, "metric": "top1", "value": 90.0,
         "source": "Table 1"}]}
    (board / "submission.json").write_text(json.dumps(card))
    write_leaderboard(board)
    section = (board / "leaderboard.html").read_text().split('id="defense-mine"')[1].split("</section>")[0]
    assert "Someone et al., 2026" in section and "70.0 ±" in section and "below claimed" in section


def test_folders_merge_unless_their_protocol_differs(tmp_path, capsys):
    """Models, weights and library versions may differ between merged folders; the seed, a
    dataset's subset, what an attack label does and the precision may not."""
    folders = {n: tmp_path / n for n in ("first", "second", "subset", "seed", "attack")}
    for folder in folders.values():
        folder.mkdir()
    for dataset in ("a", "b"):
        cell(folders["first"], "none", "none", dataset, ones(60))
        cell(folders["second"], "submitted", "none", dataset, ones(65), model="ViT-L-14", entry="mine",
             versions={"vlbench": "0.1.0", "torch": "2.2.0", "open_clip": "3.3.0"})
        cell(folders["subset"], "other", "none", dataset, ones(65), subset="t")
        cell(folders["seed"], "other", "none", dataset, ones(65), seed=1)
        cell(folders["attack"], "other", "none", dataset, ones(65), attack_params={"steps": 3})
    assert main(["leaderboard", str(folders["first"]), str(folders["second"]), "--out", str(tmp_path / "merged")]) == 0
    markdown = (tmp_path / "merged" / "leaderboard.md").read_text()
    assert "| none " in markdown and "| submitted " in markdown
    # each row says what model it is
    assert "| submitted | submitted | ViT-L-14       | mine" in markdown and "hf-hub:org/mine" in markdown
    html = (tmp_path / "merged" / "leaderboard.html").read_text()
    assert '<span class="model">ViT-L-14 · mine</span>' in html
    csv = (tmp_path / "merged" / "leaderboard.csv").read_text()
    assert "ViT-L-14,mine,hf-hub:org/mine" in csv
    for name, named in (("subset", "a subset: s-a (n=100) in"), ("seed", "seed: 0 in"), ("attack", "attack none")):
        assert main(["leaderboard", str(folders["first"]), str(folders[name]), "--out", str(tmp_path / name)]) == 2
        error = capsys.readouterr().err
        assert named in error and error.count("\n") == 1 and not (tmp_path / name / "leaderboard.html").exists()
    assert main(["leaderboard", str(folders["first"]), str(folders["second"])]) == 2
    assert "pass --out" in capsys.readouterr().err


def test_one_label_on_two_base_models_is_two_rows(tmp_path):
    """Two folders' `none` rows on different weights (another release, or the same entry built
    with other bits) are never shown as one row."""
    first, second, third = (tmp_path / n for n in ("first", "second", "third"))
    for folder in (first, second, third):
        folder.mkdir()
    for dataset in ("a", "b"):
        cell(first, "none", "none", dataset, ones(60), entry="world-clip", weights="1111aaaa")
        cell(second, "none", "none", dataset, ones(40), entry="world-clip", weights="2222bbbb")
        cell(third, "none", "none", dataset, ones(30), entry="tecoa-vit-b-32")
    assert main(["leaderboard", str(first), str(second), str(third), "--out", str(tmp_path / "merged")]) == 0
    markdown = (tmp_path / "merged" / "leaderboard.md").read_text()
    rows = {line.split("|")[1].strip() for line in markdown.split("**Models**")[1].splitlines() if line.startswith("| none")}
    assert rows == {"none [world-clip weights 1111aaaa-loa]", "none [world-clip weights 2222bbbb-loa]",
                    "none [tecoa-vit-b-32]"}


def test_the_run_records_its_commands_once_each(tmp_path):
    for argv in (["run", "matrix", "--out", "x"], ["run", "matrix", "--out", "x"], ["run", "matrix", "--limit", "5"]):
        record_command(tmp_path, argv)
    assert json.loads((tmp_path / "run.json").read_text())["commands"] == [
        "vlbench run matrix --out x", "vlbench run matrix --limit 5"]


# -- in a real browser -------------------------------------------------------------------------
def chromium_driver(width: int = 1280, height: int = 900):
    """Headless Chromium from the system's packages through its chromedriver; skips with the
    reason where either is missing (CI installs both: .ci/run)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver); "
                    "the page's browser checks did not run")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--no-first-run",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver_path))


def test_the_page_in_headless_chromium(board):
    """Renders with no console errors, never wider than the window, sorts on a click, shows
    every figure, opens a dataset's table, and its screenshot is not blank."""
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By

    write_leaderboard(board)
    driver = chromium_driver()
    try:
        driver.get((board / "leaderboard.html").as_uri())
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        table = driver.find_element(By.CSS_SELECTOR, "#summary ~ div table.sortable")

        def rows():
            return [r.find_element(By.CSS_SELECTOR, "td a").text for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

        # ranked by the mean robust number: tecoa (40 and 42) above none (5 and 57)
        assert rows() == ["tecoa", "none"]
        assert table.find_element(By.CSS_SELECTOR, "tbody .flag").text == "below claimed"
        header = table.find_element(By.XPATH, ".//thead/tr/th[3]")  # clean: none 60, tecoa 45
        header.click()
        assert rows() == ["none", "tecoa"] and header.get_attribute("data-dir") == "desc"
        header.click()
        assert rows() == ["tecoa", "none"] and header.get_attribute("data-dir") == "asc"
        table.find_element(By.XPATH, ".//thead/tr/th[2]").click()  # by label, descending
        assert rows() == ["tecoa", "none"]
        table.find_element(By.XPATH, ".//thead/tr/th[1]").click()  # by rank
        table.find_element(By.XPATH, ".//thead/tr/th[1]").click()
        assert rows() == ["tecoa", "none"]
        figures = driver.find_elements(By.CSS_SELECTOR, "figure svg")
        assert len(figures) == len(list((board / "figures").glob("*.png"))) == 3
        for figure in figures:
            driver.execute_script("arguments[0].scrollIntoView()", figure)
            assert figure.size["width"] > 200 and figure.size["height"] > 150
        details = driver.find_element(By.CSS_SELECTOR, "#datasets ~ details")
        assert not details.find_element(By.TAG_NAME, "table").is_displayed()
        details.find_element(By.TAG_NAME, "summary").click()
        assert details.find_element(By.TAG_NAME, "table").is_displayed()
        driver.execute_script("window.scrollTo(0, 0)")
        shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
        assert shot.shape[1] >= 1200
        background = np.all(shot == shot[0, 0], axis=-1).mean()
        assert background < 0.9 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 50
    finally:
        driver.quit()


def test_the_committed_world_page_fits_a_1280_px_window(tmp_path):
    """The committed world results (266 cells, 11 attacks): no table or figure makes the page
    wider than the window; wide tables scroll inside their own box."""
    from selenium.webdriver.common.by import By

    shutil.copytree(ROOT / "results" / "world" / "cells", tmp_path / "cells")
    write_leaderboard(tmp_path)
    driver = chromium_driver(1280, 900)
    try:
        driver.get((tmp_path / "leaderboard.html").as_uri())
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
        for details in driver.find_elements(By.CSS_SELECTOR, "details"):
            details.find_element(By.TAG_NAME, "summary").click()
        assert driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#summary ~ div table.sortable tbody tr")) >= 7
    finally:
        driver.quit()
