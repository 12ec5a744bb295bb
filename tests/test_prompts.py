"""One owner per fact: the sampling defaults (model.SAMPLING_DEFAULTS) as sample.py, eval.py, serve.py and its page
use them, and the instruction header before a prompt (instruct.instructed_prompt) as sample.py and serve.py build
it."""
import json
import re
import runpy
import socket
import threading

import pytest

import serve
from configurator import configure
from errors import UserError
from instruct import header, instructed_prompt
from model import SAMPLING_DEFAULTS
from conftest import ROOT, chromium

SAMPLING = ["temperature", "top_k", "top_p", "max_new_tokens"]


def settings(script):
    """A script's settings as a fresh run of it starts with (its top level run anew, not the imported module, whose
    settings another test's main() may have changed): {name: value} of its globals."""
    return runpy.run_path(str(ROOT / script))


# --- the sampling defaults ----------------------------------------------------------------------------------------

def test_sampling_defaults_are_the_ones_the_tests_expect():
    # the owner's keys are what sample.py, eval.py and serve.py read; a missing one would be a KeyError there
    assert set(SAMPLING_DEFAULTS) == set(SAMPLING)


@pytest.mark.parametrize("script", ["sample.py", "eval.py"])
def test_script_settings_are_the_sampling_defaults(script):
    got = settings(script)
    assert {k: got[k] for k in SAMPLING} == SAMPLING_DEFAULTS
    assert all(type(got[k]) is type(SAMPLING_DEFAULTS[k]) for k in SAMPLING)  # --top_k=5 must still be an int


@pytest.mark.parametrize("script", ["sample.py", "eval.py"])
def test_help_lists_the_defaults_with_their_comments(script, capsys):
    with pytest.raises(SystemExit) as e:
        configure(settings(script), argv=["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, comment in [("temperature", "< 1 sharper, > 1 more random, 0 greedy"),
                          ("top_k", "sample among the k most likely tokens (0: all)"),
                          ("top_p", "nucleus sampling"), ("max_new_tokens", "tokens per story at most")]:
        line = next(line for line in out.splitlines() if line.strip().startswith(f"--{name}="))
        assert f"--{name}={SAMPLING_DEFAULTS[name]!r}" in line and comment in line, line


def test_a_request_without_settings_gets_the_sampling_defaults():
    req = serve.parse_request("", 1)
    assert req == {"prompt": "", "model": 0, **SAMPLING_DEFAULTS}
    assert all(type(req[k]) is type(SAMPLING_DEFAULTS[k]) for k in SAMPLING)
    assert serve.parse_request("prompt=Once&top_k=5", 1) == {"prompt": "Once", "model": 0,
                                                             **SAMPLING_DEFAULTS, "top_k": 5}


def test_a_server_with_a_lower_limit_caps_the_default_length(monkeypatch):
    monkeypatch.setattr(serve, "max_new_tokens", 100)  # serve.py --max_new_tokens=100
    assert serve.parse_request("", 1)["max_new_tokens"] == 100
    assert serve.sampling_defaults() == {**SAMPLING_DEFAULTS, "max_new_tokens": 100}
    assert json.loads(page_constant(serve.page_html([]), "DEFAULTS"))["max_new_tokens"] == 100
    with pytest.raises(UserError, match="more than this server allows"):
        serve.parse_request("max_new_tokens=101", 1)


def page_constant(page, name):
    """The JSON text serve.py put in the page's `const NAME = ...;` line."""
    found = re.findall(rf"^const {name} = (.*);", page, re.M)
    assert len(found) == 1, f"{name} is set {len(found)} times in the page"
    return found[0]


def test_the_page_file_does_not_repeat_the_numbers():
    html = (ROOT / "serve.html").read_text(encoding="utf-8")
    for name in SAMPLING:
        tag = re.search(rf'<input id="{name}"[^>]*>', html)
        assert tag and "value=" not in tag.group(), tag
    assert "const DEFAULTS = {};" in html and "const MODELS = [];" in html  # what page_html fills in


@pytest.fixture
def page_server():
    """serve.py's server in this process on a free port of 127.0.0.1, serving page_html for one model; yields it."""
    about = [{"name": "out</script><b>", "about": "1.0M parameters"}]
    server = serve.make_server("127.0.0.1", 0, [], serve.page_html(about))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def get_page(server):
    """(status, body) of GET / from `server`."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        reply = s.makefile("rb").read().decode()
    head, _, body = reply.partition("\r\n\r\n")
    return int(head.split()[1]), body


def test_the_served_page_carries_the_sampling_defaults(page_server):
    status, page = get_page(page_server)
    assert status == 200
    assert json.loads(page_constant(page, "DEFAULTS")) == SAMPLING_DEFAULTS
    models = page_constant(page, "MODELS")
    assert "</script>" not in models  # escaped, so a folder's name cannot end the page's script
    assert json.loads(models) == [{"name": "out</script><b>", "about": "1.0M parameters"}]


@pytest.mark.slow  # starts a browser
def test_the_page_fields_start_at_the_sampling_defaults_in_chromium(page_server):
    sync_api, browser_path = chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{page_server.server_address[1]}")
        values = {name: page.input_value(f"#{name}") for name in SAMPLING}
        assert page.locator(".story h2").text_content() == "out</script><b>"
        browser.close()
    assert {k: type(SAMPLING_DEFAULTS[k])(v) for k, v in values.items()} == SAMPLING_DEFAULTS


# --- the instruction header ---------------------------------------------------------------------------------------

def test_no_fields_leave_the_prompt_as_it_is():
    assert instructed_prompt("Once upon") == "Once upon"
    assert instructed_prompt("Once upon", "", "", "") == "Once upon"
    assert instructed_prompt("Once upon", " ", "\n", None) == "Once upon"  # blank fields are not given
    assert instructed_prompt("", [], [], None) == ""


def test_fields_put_the_header_before_the_prompt():
    expected = "Words: play, ball, red\nFeatures: Dialogue\nSummary: Tom plays with a ball.\nStory:\nOnce"
    assert instructed_prompt("Once", "play, ball,red", "Dialogue", "Tom plays\nwith a ball.") == expected
    assert instructed_prompt("Once", ["play", "ball", "red"], ["Dialogue"], "Tom plays with a ball.") == expected
    assert instructed_prompt("", "dog", "", "") == header(["dog"]) == "Words: dog\nStory:\n"
    assert instructed_prompt("Hi", ",", "", "") == "Story:\nHi"  # a field given, with no item: the bare header


@pytest.mark.parametrize("words,features,summary,message", [
    ("", "", 5, "summary holds int"),
    (["a,b"], "", "", "words has an item with a comma"),
    ("", [["Dialogue"]], "", "features holds list"),
])
def test_a_bad_field_is_a_user_error(words, features, summary, message):
    with pytest.raises(UserError, match=f"^bad instruction: {message}"):
        instructed_prompt("Once", words, features, summary)


def test_sample_builds_its_prompt_with_instructed_prompt(monkeypatch, capsys):
    import sample
    monkeypatch.setattr(sample, "words", "play, ball,red")
    monkeypatch.setattr(sample, "features", "Dialogue")
    monkeypatch.setattr(sample, "summary", "Tom plays\nwith a ball.")
    expected = instructed_prompt("Once", "play, ball,red", "Dialogue", "Tom plays\nwith a ball.")
    assert sample.instructed("Once", {"instruct": True}) == expected
    assert "not trained with instructions" not in capsys.readouterr().err
    assert sample.instructed("Once", {}) == expected
    assert "not trained with instructions" in capsys.readouterr().err  # the note stays sample.py's
    for name in ("words", "features", "summary"):
        monkeypatch.setattr(sample, name, "")
    assert sample.instructed("Once", {}) == "Once"
    assert capsys.readouterr().err == ""  # no header, no note
    monkeypatch.setattr(sample, "summary", 7)  # a setting of the wrong type (configure refuses it before)
    with pytest.raises(UserError, match="^bad instruction: summary holds int"):
        sample.instructed("Once", {"instruct": True})


def test_serve_builds_its_prompt_with_instructed_prompt():
    expected = instructed_prompt("Once", "play, ball,red", "Dialogue", "Tom plays\nwith a ball.")
    query = "prompt=Once&words=play%2C%20ball%2Cred&features=Dialogue&summary=Tom%20plays%0Awith%20a%20ball."
    assert serve.parse_request(query, 1)["prompt"] == expected
    assert serve.parse_request("prompt=Once&words=&features=%20&summary=", 1)["prompt"] == "Once"
