"""Who may call: API keys from a file, the systemd credential or the environment; every route but /health asks
for `Authorization: Bearer KEY` (the official OpenAI client's api_key) on a real `edgepack serve`; the unit
hands the key file over as a credential."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import run_cli, serving, start_server, stop_server, wait_ready

from edgepack.runtime import auth
from edgepack.runtime.auth import ApiKeys, load_api_keys
from edgepack.runtime.errors import EdgepackError
from edgepack.runtime.systemd_unit import render_unit

KEY = "ep-test-key-0123456789"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"# the fleet's keys\n\n  {KEY}  \nep-second-key\n")
    return path


@pytest.fixture(scope="module")
def locked(served_store, key_file):
    with serving(served_store, "--threads", "1", "--api-key-file", str(key_file)) as base:
        yield base


def _get(url: str, key: str | None = None, method: str = "GET", headers: dict | None = None) -> tuple[int, dict]:
    headers = dict(headers or {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


# ---- the keys ---------------------------------------------------------------------------------


def test_keys_come_from_the_file_the_credential_and_the_environment(tmp_path, key_file):
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "edgepack-api-keys").write_text("from-systemd\n")
    keys = load_api_keys(key_file, {"CREDENTIALS_DIRECTORY": str(credentials), "EDGEPACK_API_KEYS": "env-a, env-b"})
    assert keys.keys == (KEY.encode(), b"ep-second-key", b"from-systemd", b"env-a", b"env-b")
    assert keys.sources == (str(key_file), str(credentials / "edgepack-api-keys"), "$EDGEPACK_API_KEYS")
    assert not load_api_keys(None, {})  # none given: the server stays open (loopback by default)


@pytest.mark.parametrize("content, message", [
    ("", "no API key in it"),
    ("# only a comment\n\n", "no API key in it"),
    ("good-key\nbad key with spaces\n", "line 2: expected printable ASCII without spaces"),
    ("clé\n", "line 1: expected printable ASCII"),
])
def test_a_key_file_without_usable_keys_is_refused(tmp_path, content, message):
    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(EdgepackError, match=message):
        load_api_keys(path, {})


def test_an_empty_environment_variable_is_refused_not_read_as_open():
    with pytest.raises(EdgepackError, match=r"\$EDGEPACK_API_KEYS: no API key"):
        load_api_keys(None, {"EDGEPACK_API_KEYS": " , "})


def test_every_key_is_compared_in_constant_time(monkeypatch):
    compared = []

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", compare_digest)
    keys = ApiKeys((b"first", b"second", b"third"), ("test",))
    assert keys.accepts(b"first") and compared == [b"first", b"second", b"third"]  # no early exit on a match
    assert not keys.accepts(b"firs")


@pytest.mark.parametrize("problem", ["empty", "missing"])
def test_serve_with_an_unusable_key_file_is_one_line_and_exit_1(served_store, tmp_path, problem):
    path = tmp_path / "keys"
    if problem == "empty":
        path.write_text("\n")
    result = run_cli("serve", "--store", str(served_store), "--api-key-file", str(path), timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in result.stderr


def test_serve_takes_no_key_on_the_command_line(served_store):
    result = run_cli("serve", "--store", str(served_store), "--api-key", KEY, timeout=60)
    assert result.returncode == 2 and "No such option" in result.stderr


# ---- a server with keys -----------------------------------------------------------------------


def test_the_openai_client_with_the_key_is_served_and_with_another_is_refused(locked):
    client = openai.OpenAI(base_url=locked + "/v1", api_key=KEY, max_retries=0)
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].message.content is not None
    streamed = client.completions.create(model="tiny", prompt="hi", max_tokens=4, stream=True)
    assert list(streamed)
    wrong = openai.OpenAI(base_url=locked + "/v1", api_key="ep-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    assert refused.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("path, method", [("/v1/models", "GET"), ("/v1/chat/completions", "POST"),
                                          ("/v1/completions", "POST"), ("/completion", "POST"),
                                          ("/tokenize", "POST"), ("/props", "GET"), ("/slots", "GET"),
                                          ("/metrics", "GET"), ("/no-such-route", "GET")])
def test_every_route_but_health_needs_the_key(locked, path, method):
    status, headers = _get(locked + path, method=method)
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="edgepack"'
    status, headers = _get(locked + path, "ep-second-kez", method=method)
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]
    status, _ = _get(locked + path, method=method, headers={"Authorization": f"Basic {KEY}"})
    assert status == 401
    assert _get(locked + "/health")[0] == 200
    assert _get(locked + "/v1/models", "ep-second-key")[0] == 200


def test_metrics_can_be_kept_open_and_keys_read_from_the_environment(served_store, monkeypatch):
    monkeypatch.setenv("EDGEPACK_API_KEYS", "env-key-1,env-key-2")
    with serving(served_store, "--threads", "1", "--metrics-open") as base:
        assert _get(base + "/metrics")[0] == 200
        assert _get(base + "/v1/models")[0] == 401
        assert _get(base + "/v1/models", "env-key-2")[0] == 200


def test_keys_are_read_from_the_systemd_credential(served_store, tmp_path, monkeypatch):
    (tmp_path / "edgepack-api-keys").write_text("systemd-key\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with serving(served_store, "--threads", "1") as base:
        assert _get(base + "/v1/models")[0] == 401
        assert _get(base + "/v1/models", "systemd-key")[0] == 200


def test_cors_preflight_needs_no_key_and_a_refusal_is_readable_by_the_page(served_store, key_file):
    origin = {"Origin": "https://app.example"}
    with serving(served_store, "--threads", "1", "--api-key-file", str(key_file), "--cors-origins",
                 "https://app.example") as base:
        status, headers = _get(base + "/v1/chat/completions", method="OPTIONS", headers={
            **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
        assert status == 200
        status, headers = _get(base + "/v1/models", headers=origin)
        assert status == 401 and headers["access-control-allow-origin"] == "https://app.example"


def _start_stderr(store: Path, *extra: str) -> str:
    process, base = start_server(store, "--threads", "1", *extra)
    try:
        wait_ready(base, process)
    finally:
        stop_server(process)
    return process.stderr.read()


def test_listening_beyond_loopback_without_a_key_warns_once(served_store, key_file):
    open_to_all = _start_stderr(served_store, "--host", "0.0.0.0")
    warnings = [line for line in open_to_all.splitlines() if "without an API key" in line]
    assert len(warnings) == 1 and warnings[0].startswith("edgepack: warning: http://0.0.0.0:")
    assert "without an API key" not in _start_stderr(served_store)  # loopback
    with_key = _start_stderr(served_store, "--host", "0.0.0.0", "--api-key-file", str(key_file))
    assert "without an API key" not in with_key and f"2 API key(s) from {key_file}" in with_key


# ---- the unit ---------------------------------------------------------------------------------


def test_the_unit_hands_the_key_file_over_as_a_credential(tmp_path):
    unit = render_unit(Path("/var/lib/edgepack"), user="edgepack", host="0.0.0.0",
                       api_key_file=Path("/etc/edgepack/api-keys"), executable=Path(shutil.which("true")))
    assert "LoadCredential=edgepack-api-keys:/etc/edgepack/api-keys" in unit.splitlines()
    assert "api-keys" not in next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert "LoadCredential" not in render_unit(Path("/var/lib/edgepack"), executable=Path("/usr/bin/edgepack"))
    if shutil.which("systemd-analyze"):
        (tmp_path / "edgepack.service").write_text(unit)
        result = subprocess.run(["systemd-analyze", "verify", "./edgepack.service"], capture_output=True, text=True,
                                cwd=tmp_path, timeout=60)
        assert result.returncode == 0 and "edgepack.service" not in result.stderr, result.stderr


@pytest.mark.parametrize("path", ["keys", "/etc/edge pack/keys", "/etc/edgepack/\"keys"])
def test_the_unit_refuses_a_key_file_systemd_could_not_read(path):
    with pytest.raises(EdgepackError, match="API key file"):
        render_unit(Path("/var/lib/edgepack"), api_key_file=Path(path), executable=Path("/usr/bin/edgepack"))


def test_unit_command_takes_the_key_file(served_store):
    result = run_cli("unit", "--store", str(served_store), "--executable", shutil.which("true") or "/bin/true",
                     "--api-key-file", "/etc/edgepack/api-keys", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "LoadCredential=edgepack-api-keys:/etc/edgepack/api-keys" in result.stdout


def test_status_sends_a_key_to_a_locked_server_and_says_when_it_needs_one(locked, key_file):
    without = run_cli("status", "--url", locked)
    assert without.returncode == 1 and without.stderr.strip().splitlines() == [
        f"Error: the server at {locked} wants an API key for /metrics: give --api-key-file or $EDGEPACK_API_KEYS"]
    shown = run_cli("status", "--url", locked, "--api-key-file", str(key_file))
    assert shown.returncode == 0 and "requests" in shown.stdout, shown.stderr
