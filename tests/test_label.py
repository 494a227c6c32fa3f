"""Human feedback collection: the HTTP API (with the standard library's client), restart
persistence, concurrent labellers, export, `fastrlhf pairs`, and the page in headless Chromium."""

import http.client
import json
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from fastrlhf import cli, data, label


def _pairs_file(path: Path, n: int) -> Path:
    rows = [{"prompt": f"{i}+{i}=", "a": str(2 * i), "b": str(2 * i + 1), "source": "test"} for i in range(n)]
    rows[0]["id"] = "first"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _call(base: str, method: str, path: str, body=None):
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path, body=None if body is None else (body if isinstance(body, bytes) else json.dumps(body)),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, (json.loads(raw) if raw else None)


@pytest.fixture
def served(tmp_path):
    store = label.Store(tmp_path / "prefs.sqlite")
    store.add_pairs(label.load_pairs(_pairs_file(tmp_path / "pairs.jsonl", 5)))
    server, base = label.serve_in_thread(store)
    yield store, base, tmp_path
    server.shutdown()
    server.server_close()


def test_api_flow_errors_and_export(served):
    store, base, tmp = served
    status, pair = _call(base, "GET", "/api/next")
    assert status == 200 and pair["id"] == "first" and pair["prompt"] == "0+0=" and pair["total"] == 5
    assert _call(base, "POST", "/api/choice", {"id": "first", "choice": "a"}) == (200, {"answered": 1, "total": 5})
    # the answered pair is never served again; a second answer is refused, not duplicated
    assert _call(base, "POST", "/api/choice", {"id": "first", "choice": "b"})[0] == 409
    # bad input: 4xx with a message, never a 500
    status, body = _call(base, "POST", "/api/choice", {"id": "nope", "choice": "a"})
    assert status == 404 and "nope" in body["error"]
    status, body = _call(base, "POST", "/api/choice", {"id": "first", "choice": "c"})
    assert status == 400 and "choice must be one of" in body["error"]
    assert _call(base, "POST", "/api/choice", b"{not json")[0] == 400
    assert _call(base, "POST", "/api/choice", {"id": 3})[0] == 400
    assert _call(base, "GET", "/api/other")[0] == 404
    seen = {"first"}
    for choice in ("b", "tie", "skip", "a"):
        status, pair = _call(base, "GET", "/api/next")
        assert status == 200 and pair["id"] not in seen
        seen.add(pair["id"])
        assert _call(base, "POST", "/api/choice", {"id": pair["id"], "choice": choice})[0] == 200
    assert _call(base, "GET", "/api/next") == (204, None)
    assert store.export(tmp / "prefs.jsonl") == {"exported": 3, "ties": 1, "skips": 1}
    prefs = data.load_preferences(tmp / "prefs.jsonl")  # the format rm / dpo read
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in prefs] == [
        ("0+0=", "0", "1"), ("1+1=", "3", "2"), ("4+4=", "8", "9")]


def test_restart_keeps_answers_and_never_reserves_them(tmp_path):
    pairs = _pairs_file(tmp_path / "pairs.jsonl", 3)
    store = label.Store(tmp_path / "db.sqlite")
    store.add_pairs(label.load_pairs(pairs))
    server, base = label.serve_in_thread(store)
    _, pair = _call(base, "GET", "/api/next")
    _call(base, "POST", "/api/choice", {"id": pair["id"], "choice": "b"})
    server.shutdown()
    server.server_close()
    # a new process: same database, the same pairs file added again (no duplicates)
    store2 = label.Store(tmp_path / "db.sqlite")
    assert store2.add_pairs(label.load_pairs(pairs)) == 0
    server, base = label.serve_in_thread(store2)
    try:
        _, nxt = _call(base, "GET", "/api/next")
        assert nxt["id"] != pair["id"] and (nxt["answered"], nxt["total"]) == (1, 3)
    finally:
        server.shutdown()
        server.server_close()


def test_concurrent_labellers_lose_and_duplicate_nothing(tmp_path):
    store = label.Store(tmp_path / "db.sqlite")
    rows = [{"prompt": f"p{i}", "a": "x", "b": f"y{i}"} for i in range(60)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store.add_pairs(label.load_pairs(tmp_path / "p.jsonl"))
    server, base = label.serve_in_thread(store)
    answered, errors = [], []

    def labeller(k):
        while True:
            status, pair = _call(base, "GET", "/api/next")
            if status == 204:
                return
            status, body = _call(base, "POST", "/api/choice", {"id": pair["id"], "choice": "ab"[k % 2]})
            (answered if status == 200 else errors).append((pair["id"], status))

    threads = [threading.Thread(target=labeller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.shutdown()
    server.server_close()
    ids = [i for i, _ in answered]
    assert errors == [] and len(ids) == len(set(ids)) == 60  # leases: nobody got a pair twice
    db = sqlite3.connect(tmp_path / "db.sqlite")
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM answers").fetchone() == (60, 60)


def test_bad_pairs_file_names_file_line_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "a": "2", "b": "3"}\n{"prompt": "1+2=", "a": "3"}\n')
    code = cli.main(["label", "--data", str(bad), "--db", str(tmp_path / "x.sqlite")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2: missing field 'b'" in err and "Traceback" not in err


def test_export_cli(served, capsys):
    store, _, tmp = served
    store.answer("first", "b")
    assert cli.main(["label", "--db", str(tmp / "prefs.sqlite"), "--export", str(tmp / "out.jsonl")]) == 0
    assert "wrote 1 preference pairs" in capsys.readouterr().out
    assert json.loads((tmp / "out.jsonl").read_text()) == {"prompt": "0+0=", "chosen": "1", "rejected": "0"}


@pytest.mark.slow
def test_pairs_command_samples_two_distinct_responses(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRLHF_KERNEL_IMPL", "torch")
    from fastrlhf.tasks import arithmetic as ar

    model = ar.save_base_model(tmp_path / "m", **ar.MODEL_SIZES["tiny"])
    prompts = ar.write_jsonl(ar.heldout_prompts(ar.ArithmeticTask(), 6), tmp_path / "prompts.jsonl")
    out = tmp_path / "pairs.jsonl"
    summary = __import__("fastrlhf.pairs", fromlist=["main"]).main(
        ["--model", str(model), "--prompts", str(prompts), "--out", str(out), "--engine", "hf",
         "--max-new-tokens", "4", "--device", "cpu"])
    pairs = label.load_pairs(out)  # what fastrlhf label reads
    assert len(pairs) + summary["skipped_identical"] == 6 and len(pairs) > 0
    assert all(p["a"] != p["b"] and p["answer"] and p["model"] == str(model) for p in pairs)


@pytest.mark.slow
def test_page_in_headless_chromium_saves_the_click(served):
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make setup installs it)")
    store, base, tmp = served
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1100, "height": 560})
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('prompt').textContent === '0+0='")
        assert page.inner_text("#progress") == "0 / 5 answered"
        page.click("#choose-b")
        page.wait_for_function("document.getElementById('prompt').textContent === '1+1='")
        page.keyboard.press("1")  # the keyboard shortcut for A
        page.wait_for_function("document.getElementById('progress').textContent === '2 / 5 answered'")
        page.screenshot(path=str(tmp / "page.png"))
        browser.close()
    db = sqlite3.connect(tmp / "prefs.sqlite")
    rows = db.execute("SELECT p.prompt, x.choice FROM answers x JOIN pairs p USING (id) ORDER BY p.position").fetchall()
    assert rows == [("0+0=", "b"), ("1+1=", "a")]
    assert (tmp / "page.png").stat().st_size > 5000
