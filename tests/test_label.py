"""Human feedback collection: the HTTP API (with the standard library's client), restart
persistence, concurrent labellers, export, `fastrlhf pairs`, and the page in headless Chromium."""

import http.client
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from fastrlhf import cli, data, label


def _pairs_file(path: Path, n: int) -> Path:
    rows = [{"prompt": f"{i}+{i}=", "a": str(2 * i), "b": str(2 * i + 1), "source": "test"} for i in range(n)]
    rows[0]["id"] = "first"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _call(base: str, method: str, path: str, body=None, headers=None, raw_response=False):
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path, body=None if body is None else (body if isinstance(body, bytes) else json.dumps(body)),
                 headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    if raw_response:
        return r
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
    status, pair = _call(base, "POST", "/api/next", {})
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
        status, pair = _call(base, "POST", "/api/next", {})
        assert status == 200 and pair["id"] not in seen
        seen.add(pair["id"])
        assert _call(base, "POST", "/api/choice", {"id": pair["id"], "choice": choice})[0] == 200
    assert _call(base, "POST", "/api/next", {}) == (204, None)
    assert store.export(tmp / "prefs.jsonl") == {"exported": 3, "ties": 1, "skips": 1}
    prefs = data.load_preferences(tmp / "prefs.jsonl")  # the format rm / dpo read
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in prefs] == [
        ("0+0=", "0", "1"), ("1+1=", "3", "2"), ("4+4=", "8", "9")]


def test_restart_keeps_answers_and_never_reserves_them(tmp_path):
    pairs = _pairs_file(tmp_path / "pairs.jsonl", 3)
    store = label.Store(tmp_path / "db.sqlite")
    store.add_pairs(label.load_pairs(pairs))
    server, base = label.serve_in_thread(store)
    _, pair = _call(base, "POST", "/api/next", {})
    _call(base, "POST", "/api/choice", {"id": pair["id"], "choice": "b"})
    server.shutdown()
    server.server_close()
    # a new process: same database, the same pairs file added again (no duplicates)
    store2 = label.Store(tmp_path / "db.sqlite")
    assert store2.add_pairs(label.load_pairs(pairs)) == 0
    server, base = label.serve_in_thread(store2)
    try:
        _, nxt = _call(base, "POST", "/api/next", {})
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
            status, pair = _call(base, "POST", "/api/next", {})
            if status == 204:
                return
            if "waiting" in pair:  # the rest are leased to the others: they will answer them
                time.sleep(0.01)
                continue
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


def test_only_this_machines_own_page_can_use_it_on_loopback(served):
    """DNS rebinding (a foreign Host), another site's form or script (a text/plain POST, a foreign
    Origin) and a cross-site <img src=/api/next> (a GET) get nothing and change nothing."""
    store, base, _ = served
    assert _call(base, "POST", "/api/next", {}, headers={"Host": "evil.example:80"})[0] == 421
    status, body = _call(base, "POST", "/api/choice", {"id": "first", "choice": "a"},
                         headers={"Origin": "http://evil.example"})
    assert status == 403 and "evil.example" in body["error"]
    status, body = _call(base, "POST", "/api/choice", b'{"id": "first", "choice": "a"}',
                         headers={"Content-Type": "text/plain"})  # what a cross-site form can send
    assert status == 415
    status, body = _call(base, "GET", "/api/next")
    assert status == 405 and "POST" in body["error"]
    assert store.progress() == {"answered": 0, "total": 5}
    status, pair = _call(base, "POST", "/api/next", {}, headers={"Origin": base})  # the page's own origin
    assert status == 200 and pair["id"] == "first"  # the GET leased nothing
    page = _call(base, "GET", "/", raw_response=True)
    assert page.status == 200 and page.getheader("X-Frame-Options") == "DENY"


def test_beyond_loopback_a_token_and_a_name_are_required(tmp_path):
    store = label.Store(tmp_path / "db.sqlite")
    store.add_pairs(label.load_pairs(_pairs_file(tmp_path / "pairs.jsonl", 3)))
    server, _ = label.serve_in_thread(store, host="0.0.0.0", token="s3cret")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _call(base, "POST", "/api/next", {})[0] == 403
        assert _call(base, "GET", "/")[0] == 403
        assert _call(base, "POST", "/api/next", {}, headers={"X-Fastrlhf-Token": "wrong"})[0] == 403
        page = _call(base, "GET", "/?token=s3cret", raw_response=True)
        cookie = page.getheader("Set-Cookie")
        assert page.status == 200 and "fastrlhf_token=s3cret" in cookie and "SameSite=Strict" in cookie
        jar = {"Cookie": "fastrlhf_token=s3cret"}
        status, pair = _call(base, "POST", "/api/next", {}, headers=jar)
        assert status == 200
        status, body = _call(base, "POST", "/api/choice", {"id": pair["id"], "choice": "a"}, headers=jar)
        assert status == 400 and "your name" in body["error"]
        assert _call(base, "POST", "/api/choice", {"id": pair["id"], "choice": "a", "labeller": "Ada"},
                     headers={"X-Fastrlhf-Token": "s3cret"})[0] == 200
    finally:
        server.shutdown()
        server.server_close()
    db = sqlite3.connect(tmp_path / "db.sqlite")
    assert db.execute("SELECT id, choice, labeller FROM answers").fetchall() == [(pair["id"], "a", "Ada")]


def test_the_cli_beyond_loopback_prints_a_token_url_and_a_warning(tmp_path, capsys, monkeypatch):
    started = {}
    monkeypatch.setattr(label.ThreadingHTTPServer, "serve_forever", lambda self: started.setdefault("yes", self))
    _pairs_file(tmp_path / "pairs.jsonl", 2)
    assert cli.main(["label", "--data", str(tmp_path / "pairs.jsonl"), "--db", str(tmp_path / "x.sqlite"),
                     "--host", "0.0.0.0", "--port", "0"]) == 0
    started["yes"].server_close()
    err = capsys.readouterr().err
    assert "reachable by others" in err and "?token=" in err


def test_requests_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(label, "SOCKET_TIMEOUT_S", 1.0)  # (15 s in use)
    store = label.Store(tmp_path / "db.sqlite")
    store.add_pairs(label.load_pairs(_pairs_file(tmp_path / "pairs.jsonl", 3)))
    server, base = label.serve_in_thread(store)
    host, port = base.removeprefix("http://").split(":")
    status, body = _call(base, "POST", "/api/choice", b"x" * (label.MAX_BODY + 1))
    assert status == 413
    deep = b"[" * 30_000 + b"]" * 30_000  # within the limit, deeper than Python's recursion
    assert _call(base, "POST", "/api/choice", deep)[0] == 400
    # a client that announces 10 GB and stalls holds no thread: the others are served meanwhile
    import socket

    stalled = socket.create_connection((host, int(port)))
    stalled.sendall(f"POST /api/choice HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                    "Content-Length: 10000000000\r\n\r\n{".encode())
    assert stalled.recv(200).startswith(b"HTTP/1.0 413")
    stalled.close()
    slow = socket.create_connection((host, int(port)))
    slow.sendall(f"POST /api/next HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                 "Content-Length: 100\r\n\r\n{".encode())  # 99 bytes never come
    assert _call(base, "POST", "/api/next", {})[0] == 200
    slow.settimeout(label.SOCKET_TIMEOUT_S + 10)
    assert slow.recv(100) == b""  # the server hung up on it after its socket timeout
    slow.close()
    server.shutdown()
    server.server_close()


def test_forty_clients_at_once_are_all_served(served):
    _, base, _ = served
    results, lock = [], threading.Lock()

    def client():
        try:
            status = _call(base, "GET", "/", raw_response=True).status
        except OSError as e:  # a reset connection
            status = type(e).__name__
        with lock:
            results.append(status)

    threads = [threading.Thread(target=client) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 40  # 41% were reset with the default backlog of 5


def test_the_page_is_told_when_the_rest_are_leased_not_that_all_are_answered(served):
    store, base, _ = served
    for _ in range(5):  # another labeller holds every pair
        assert _call(base, "POST", "/api/next", {})[0] == 200
    status, body = _call(base, "POST", "/api/next", {})
    assert status == 200 and body == {"waiting": 5, "answered": 0, "total": 5}


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
        failed = {"n": 0}

        def fail_once(route):  # the network drops the first answer: the page says so and recovers
            if failed["n"] == 0:
                failed["n"] += 1
                return route.abort()
            return route.continue_()

        page.route("**/api/choice", fail_once)
        page.click("#choose-b")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('not saved')")
        page.click("#choose-b")  # the buttons still work
        page.wait_for_function("document.getElementById('prompt').textContent === '1+1='")
        page.keyboard.press("1")  # the keyboard shortcut for A
        page.wait_for_function("document.getElementById('progress').textContent === '2 / 5 answered'")
        page.screenshot(path=str(tmp / "page.png"))
        browser.close()
    db = sqlite3.connect(tmp / "prefs.sqlite")
    rows = db.execute("SELECT p.prompt, x.choice FROM answers x JOIN pairs p USING (id) ORDER BY p.position").fetchall()
    assert rows == [("0+0=", "b"), ("1+1=", "a")]
    assert (tmp / "page.png").stat().st_size > 5000
