"""Grade stories with a judge model, as in the TinyStories paper (Eldan & Li 2023, "TinyStories: How Small Can
Language Models Be and Still Speak Coherent English?"): an OpenAI-compatible chat-completions server grades each
story for grammar, creativity, consistency and plot, 1 to 10.

eval.py uses it with --judge_url and --judge_model; on its own:

    from judge import judge_samples
    judge_samples([{"prompt": "Once upon a time", "text": " there was a cat."}], "http://localhost:8000/v1", "m")

The server is asked for a JSON object; answers that cannot be parsed are counted and skipped, and grading fails
only if none parse. Only the standard library is used (urllib).
"""

import http.client
import json
import re
import threading
import urllib.error
import urllib.request

from configurator import UserError

CRITERIA = ("grammar", "creativity", "consistency", "plot")

_JUDGE_SYSTEM = "You are a teacher who grades short stories written by young students. You answer only in JSON."
_JUDGE_PROMPT = """\
In the following exercise, the student is given a beginning of a story. The student needs to complete it into a \
full story. The exercise tests the student's language abilities and creativity. The symbol *** marks the \
separator between the prescribed beginning and the student's completion:

{prompt}***{completion}

Grade the student's completion (the part after the *** symbol). Is it grammatically correct? Is it consistent \
with the beginning of the story? Pay special attention to whether the student manages to complete the sentence \
which is split in the middle by the separator ***. Give grades for grammar, creativity, consistency with the \
story's beginning, and whether the plot makes sense, each an integer from 1 (worst) to 10 (best).

Answer with one JSON object and nothing else, in exactly this form, each value an integer from 1 to 10:
{{"grammar": G, "creativity": C, "consistency": S, "plot": P}}"""


def parse_grades(reply):
    """Grades from a judge's answer: the first JSON object in it (code fences and text around it allowed),
    else "name: number" pairs. Every criterion must be present with a number from 1 to 10 ("8/10" reads as 8).
    Returns dict criterion -> float, or None when the answer cannot be parsed."""
    found = {}
    start, end = reply.find("{"), reply.rfind("}")
    if 0 <= start < end:
        try:
            obj = json.loads(reply[start:end + 1])
            if isinstance(obj, dict):
                found = {str(k).strip().lower(): v for k, v in obj.items()}
        except ValueError:
            pass
    if not all(c in found for c in CRITERIA):
        found = {m.group(1).lower(): m.group(2) for m in re.finditer(
            r"\"?\b(grammar|creativity|consistency|plot)\b\"?\s*[:=]\s*\"?(\d+(?:\.\d+)?)", reply, re.IGNORECASE)}
    grades = {}
    for c in CRITERIA:
        value = found.get(c)
        if isinstance(value, str):
            value = value.strip().split("/")[0].strip()
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        if isinstance(found.get(c), bool) or not 1 <= value <= 10:
            return None
        grades[c] = value
    return grades


def _post(request, timeout):
    """Send `request` and read the whole answer within `timeout` seconds in all. urllib's own timeout bounds each
    socket operation, so a server that trickles a byte at a time could hold one request for hours; here the
    request runs in a daemon thread, and a deadline on joining it bounds the total. Returns the body (bytes);
    raises what urlopen raises, or TimeoutError."""
    result = {}

    def send():
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                result["body"] = response.read()
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=send, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError
    if "error" in result:
        raise result["error"]
    return result["body"]


def chat(url, model_name, messages, api_key=None, timeout=120.0, temperature=0.0):
    """One OpenAI chat-completions request: POST {url}/chat/completions, answered within `timeout` seconds in all
    (connecting and reading the whole answer). Returns the answer's text.
    temperature < 0 is not sent. Raises UserError naming the endpoint: not an http(s) URL, connection refused
    or unknown host, timeout, HTTP error (with the start of the server's message), or an answer that is not
    chat-completions JSON."""
    endpoint = url.rstrip("/") + "/chat/completions"
    body = {"model": model_name, "messages": messages}
    if temperature >= 0:
        body["temperature"] = temperature
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        raw = _post(request, timeout)
    except urllib.error.HTTPError as e:
        try:
            detail = " ".join(e.read().decode("utf-8", "replace").split())[:200]
        except (OSError, http.client.HTTPException):
            detail = ""
        hint = " (check the API key; judge_key_env names the variable it is read from)" if e.code in (401, 403) else ""
        raise UserError(f"the judge at {endpoint} answered HTTP {e.code} {e.reason}{hint}: {detail}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise UserError(f"the judge at {endpoint} did not answer within {timeout:g} s") from None
        raise UserError(f"cannot reach the judge at {endpoint}: {e.reason}") from None
    except TimeoutError:
        raise UserError(f"the judge at {endpoint} did not answer within {timeout:g} s") from None
    except (ValueError, OSError, http.client.HTTPException) as e:  # malformed URL, reset, not HTTP, ...
        raise UserError(f"cannot reach the judge at {endpoint}: {type(e).__name__}: {e}") from None
    try:
        return json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        snippet = " ".join(raw.decode("utf-8", "replace").split())[:200]
        raise UserError(f"the judge at {endpoint} did not answer in chat-completions format: {snippet!r}") from None


def judge_samples(samples, url, model_name, api_key=None, timeout=120.0, temperature=0.0, log=None):
    """Grade each sample's continuation with a chat-completions judge, as in the TinyStories paper (Eldan & Li
    2023, "TinyStories: How Small Can Language Models Be and Still Speak Coherent English?"): grammar,
    creativity, consistency, plot, each 1 to 10. Adds "grades" (dict or None if unparseable) to each sample.

    Returns:
        dict: one mean per criterion over the parsed answers, graded (how many parsed), unparseable (how many
        did not), model.
    Raises:
        UserError: any request fails (see `chat`), or not a single answer could be parsed.
    """
    graded, first_bad = [], None
    for i, s in enumerate(samples):
        prompt = _JUDGE_PROMPT.format(prompt=s["prompt"], completion=s["text"])
        reply = chat(url, model_name, [{"role": "system", "content": _JUDGE_SYSTEM},
                                       {"role": "user", "content": prompt}], api_key, timeout, temperature)
        s["grades"] = parse_grades(reply if isinstance(reply, str) else "")
        if s["grades"] is None:
            first_bad = first_bad if first_bad is not None else reply
        else:
            graded.append(s["grades"])
        if log:
            log(i + 1, len(samples))
    if not graded:
        snippet = " ".join(str(first_bad).split())[:200]
        raise UserError(f"none of the {len(samples)} answers of the judge at {url} held grades in the asked JSON "
                        f"form; the first was: {snippet!r}")
    return {**{c: sum(g[c] for g in graded) / len(graded) for c in CRITERIA},
            "graded": len(graded), "unparseable": len(samples) - len(graded), "model": model_name}
