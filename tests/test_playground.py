"""The playground page, driven in a real headless Chromium (Debian's ``chromium``, via Playwright)
against the real server and embedded model, plus the HTTP side it relies on: the stream's
``include_backtrack`` extension (checked with the official ``openai`` client) and the stateless
candidates route of the human-guidance mode.

Set PLAYGROUND_SCREENSHOT=docs/playground.png to save the README's screenshot from the run.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
from playwright.sync_api import expect, sync_playwright
from serving import ServerThread

from backtrack_sampler.core.events import Transcript
from backtrack_sampler.server.app import Engine, create_app

pytestmark = pytest.mark.model
KEY = "playground-key"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SLOW = 240_000  # ms: the shared test machine can be slow
PROMPT = "The capital of France is"  # greedy: " the capital of the country of France. It is the largest ..."


from conftest import ROOT  # noqa: E402

NO_DIGITS = (ROOT / "examples" / "no_digits.py").read_text()  # the README's strategy file


@pytest.fixture(scope="module")
def server(llama_provider, tmp_path_factory):
    """The playground's server, offering NoDigits (a strategy file outside the package) besides the built-ins."""
    strategy_file = tmp_path_factory.mktemp("strategies") / "no_digits.py"
    strategy_file.write_text(NO_DIGITS)
    app = create_app(Engine(llama_provider, "gemma-test"), api_key=KEY, strategies=[f"{strategy_file}:NoDigits"])
    with ServerThread(app) as running:
        yield running


def post(server, path, body, key=KEY):
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; scripts/test.sh does)"
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """The playground, opened on a server that needs an API key: the page asks for it."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url + "/")
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key-input", KEY)
    page.click("#key-save")
    expect(page.locator("#model")).to_have_text("gemma-test")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def final_text(page) -> str:
    return "".join(page.locator("#output > .final").all_text_contents())


def add_strategy(page, name):
    """Choose ``name`` in the strategy list and add it to the chain; returns its card."""
    page.select_option("#strategy-select", name)
    page.click("#strategy-add")
    card = page.locator(f'#chain > li[data-name="{name}"]').last
    expect(card).to_be_visible()
    return card


# --- the page ------------------------------------------------------------------------------------------
def test_the_page_and_its_files_need_no_key_but_the_api_does(server):
    for path in ("/", "/static/app.js", "/static/style.css"):
        response = httpx.get(server.url + path, timeout=10)
        assert response.status_code == 200 and response.content
    assert "backtrack-sampler playground" in httpx.get(server.url + "/", timeout=10).text
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert post(server, "/v1/backtrack/candidates", {"prompt": "x"}, key="wrong").status_code == 401


def test_a_wrong_key_is_asked_again_with_the_servers_message(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    page.fill("#key-input", "wrong")
    page.click("#key-save")
    expect(page.locator("#key-dialog p")).to_contain_text("Invalid API key")
    expect(page.locator("#key-dialog")).to_be_visible()
    expect(page.locator("#model")).to_have_text("key needed")
    context.close()


def test_a_banned_phrase_is_struck_out_and_absent_from_the_final_text(page, server):
    page.fill("#prompt", PROMPT)
    page.fill("#banned", "country")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "16")
    page.click("#generate")
    expect(page.locator("#st-status")).to_have_text("done · length", timeout=SLOW)
    struck = page.locator("#output .struck")
    assert struck.count() >= 1
    assert any("country" in text for text in struck.all_text_contents())
    assert "phrase 'country'" in struck.first.get_attribute("title")
    text = final_text(page)
    assert text and "country" not in text.lower()
    assert page.locator("#output .provisional").count() == 0  # everything is final at the end
    assert page.locator("#rewinds li .rej").first.text_content().strip() == "country"
    # the page shows exactly what the API returns for the same request
    answer = post(
        server, "/v1/completions", {"prompt": PROMPT, "banned_strings": ["country"], "temperature": 0, "max_tokens": 16}
    ).json()
    assert answer["choices"][0]["text"] == text
    assert page.locator("#st-rewinds").text_content() == str(answer["backtrack"]["rewinds"])


def test_stop_stops_the_generation_on_the_server(page, server):
    page.fill("#prompt", "Once upon a time, in a small village by the sea, there lived")
    page.fill("#banned", "sea\nold\nlittle\nand\nwas")
    creative = add_strategy(page, "creative")
    expect(creative.locator('[data-param="top_p_flat"]')).to_have_attribute("placeholder", "0.65")
    page.fill("#seed", "3")
    page.fill("#temperature", "0.9")
    page.fill("#max_tokens", "2000")  # minutes of work: only Stop can end it in time
    page.click("#generate")
    page.wait_for_function(
        "Number(document.getElementById('st-rewinds').textContent) >= 4"
        " && Number(document.getElementById('st-delivered').textContent) >= 25",
        timeout=SLOW,
    )
    assert health(server)["busy"] is True
    screenshot = os.environ.get("PLAYGROUND_SCREENSHOT")
    if screenshot:
        page.screenshot(path=screenshot, full_page=True)
    page.click("#stop")
    expect(page.locator("#st-status")).to_have_text("stopped")
    deadline = time.monotonic() + 10
    while health(server)["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health(server)["busy"] is False, "the server kept generating after Stop"
    delivered = int(page.locator("#st-delivered").text_content())
    assert 25 <= delivered < 2000
    assert page.locator("#generate").is_enabled() and page.locator("#stop").is_disabled()


def test_human_guidance_accepts_clicks_and_goes_back(page, server):
    page.click("#tab-human")
    page.fill("#prompt", PROMPT)
    page.fill("#top_n", "4")
    page.click("#generate")
    candidates = page.locator("#candidates .cand:enabled")
    expect(candidates).to_have_count(4, timeout=SLOW)
    probabilities = [float(t.rstrip("%")) for t in page.locator("#candidates .cand .p").all_text_contents()]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 100.05
    first = candidates.nth(0).get_attribute("data-token")
    candidates.nth(0).click()
    expect(page.locator("#st-delivered")).to_have_text("1", timeout=SLOW)
    expect(candidates).to_have_count(4, timeout=SLOW)
    after_one = page.locator("#output .final").text_content()
    assert after_one.strip()
    candidates.nth(1).click()  # not the most likely one
    expect(page.locator("#st-delivered")).to_have_text("2", timeout=SLOW)
    expect(candidates).to_have_count(4, timeout=SLOW)
    after_two = page.locator("#output .final").text_content()
    assert after_two.startswith(after_one) and len(after_two) > len(after_one)
    page.click("#back")
    expect(page.locator("#st-delivered")).to_have_text("1", timeout=SLOW)
    expect(page.locator("#output .final")).to_have_text(after_one, timeout=SLOW)
    # the page's state agrees with the stateless route
    body = {"prompt": PROMPT, "tokens": [int(first)], "top_n": 4}
    assert post(server, "/v1/backtrack/candidates", body).json()["text"] == after_one


def test_chat_mode_and_a_slop_file(page, server, tmp_path):
    slops = tmp_path / "slop.json"
    slops.write_text(json.dumps([["tapestry", 0.1], "a testament to"]))
    page.set_input_files("#banned-file", str(slops))
    expect(page.locator("#banned")).to_have_value("tapestry\na testament to")
    expect(page.locator("#banned-count")).to_contain_text("2 phrases loaded from slop.json")
    page.click(".seg label:has(input[value=chat])")
    expect(page.locator("#system")).to_be_visible()
    page.fill("#system", "Answer in one word.")
    page.fill("#prompt", "Name a colour.")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "6")
    page.click("#generate")
    expect(page.locator("#st-status")).to_have_text(re.compile("^done"), timeout=SLOW)
    answer = post(
        server,
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Name a colour."},
            ],
            "banned_strings": ["tapestry", "a testament to"],
            "temperature": 0,
            "max_tokens": 6,
        },
    ).json()
    assert final_text(page) == answer["choices"][0]["message"]["content"] != ""


YEAR = "The Second World War ended in"  # greedy: " 1945, and the United States was in"


def test_the_strategy_controls_come_from_the_server(page, server):
    listed = httpx.get(
        server.url + "/v1/backtrack/strategies", headers={"Authorization": f"Bearer {KEY}"}, timeout=10
    ).json()["data"]
    names = [entry["name"] for entry in listed]
    assert names == [
        "none",
        "antislop",
        "creative",
        "adaptive",
        "replace",
        "repetition",
        "grammar",
        "confidence",
        "penalties",
        "dry",
        "xtc",
        "typical",
        "logit_bias",
        "NoDigits",
    ]
    assert page.locator("#strategy-select option").all_text_contents() == names[1:]
    replace = add_strategy(page, "replace")
    params = replace.locator("[data-param]")
    assert [params.nth(i).get_attribute("data-param") for i in range(params.count())] == list(
        listed[names.index("replace")]["parameters"]["properties"]
    )
    assert replace.locator('[data-param="find"]').get_attribute("data-kind") == "lines"
    assert replace.locator('[data-param="whole_words"]').get_attribute("type") == "checkbox"
    assert replace.locator('[data-param="max_prob"]').get_attribute("type") == "number"
    replace.locator("button[title=remove]").click()
    expect(page.locator("#chain > li")).to_have_count(0)


def test_a_loaded_strategy_shows_up_and_is_used(page, server):
    plain = post(server, "/v1/completions", {"prompt": YEAR, "temperature": 0, "max_tokens": 10}).json()
    assert sum(c.isdigit() for c in plain["choices"][0]["text"]) >= 4  # the strategy has work to do
    card = add_strategy(page, "NoDigits")
    expect(card).to_contain_text("Never writes a digit")
    max_bans = card.locator('[data-param="max_bans"]')
    expect(max_bans).to_have_attribute("placeholder", "100")
    page.fill("#prompt", YEAR)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "10")
    max_bans.fill("2.5")  # not an integer: the server says so, naming the parameter
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("strategy[0].max_bans", timeout=SLOW)
    expect(max_bans).to_have_class(re.compile("invalid"))
    max_bans.fill("1000")
    page.click("#generate")
    expect(page.locator("#st-status")).to_have_text(re.compile("^done"), timeout=SLOW)
    text = final_text(page)
    answer = post(
        server,
        "/v1/completions",
        {"prompt": YEAR, "temperature": 0, "max_tokens": 10, "strategy": [{"name": "NoDigits", "max_bans": 1000}]},
    ).json()
    assert text == answer["choices"][0]["text"] and re.search(r"[a-z]{3}", text)
    assert not any(c.isdigit() for c in text)


def test_a_bad_parameter_shows_the_servers_message(page, server):
    page.fill("#prompt", PROMPT)
    page.fill("#temperature", "-1")
    page.click("#generate")
    error = page.locator("#error")
    expect(error).to_be_visible(timeout=SLOW)
    message = post(server, "/v1/completions", {"prompt": PROMPT, "temperature": -1, "stream": True}).json()["error"][
        "message"
    ]
    assert "temperature" in message
    expect(error).to_have_text(message)
    expect(page.locator("#st-status")).to_have_text("error")


# --- the HTTP side ----------------------------------------------------------------------------------
def sse(response) -> list:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


def test_the_backtrack_stream_rebuilds_the_final_text_and_its_history(server):
    body = {
        "prompt": PROMPT,
        "banned_strings": ["country", "largest"],
        "temperature": 0,
        "max_tokens": 24,
        "stream": True,
    }
    plain = sse(post(server, "/v1/completions", body))
    assert all("backtrack" not in chunk and chunk["choices"] for chunk in plain)
    plain_text = "".join(chunk["choices"][0]["text"] for chunk in plain)
    chunks = sse(post(server, "/v1/completions", {**body, "stream_options": {"include_backtrack": True}}))
    transcript, text = Transcript(), ""
    for chunk in chunks:
        if "backtrack" in chunk:
            transcript.apply(chunk["backtrack"])
        if chunk["choices"]:
            text += chunk["choices"][0]["text"]
    assert text == plain_text == transcript.final and "country" not in text
    events = [chunk["backtrack"] for chunk in chunks if "backtrack" in chunk]
    rewinds = [e for e in events if e["type"] == "rewind"]
    assert rewinds and {e["reason"] for e in rewinds} <= {"phrase 'country'", "phrase 'largest'"}
    assert events[-1]["type"] == "done" and events[-1]["rewinds"] == len(rewinds)
    assert all(transcript.rewinds[e["index"]].get("chosen") for e in rewinds)
    assert "country" in transcript.render()


def test_the_backtrack_stream_honours_stop_strings(server):
    body = {
        "prompt": PROMPT,
        "banned_strings": ["country"],
        "temperature": 0,
        "max_tokens": 24,
        "stream": True,
        "stop": [" of the"],
    }
    plain = "".join(chunk["choices"][0]["text"] for chunk in sse(post(server, "/v1/completions", body)))
    chunks = sse(post(server, "/v1/completions", {**body, "stream_options": {"include_backtrack": True}}))
    transcript = Transcript()
    for chunk in chunks:
        if "backtrack" in chunk:
            transcript.apply(chunk["backtrack"])
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"])
    assert text == plain == transcript.final == " the capital"
    done = [chunk["backtrack"] for chunk in chunks if chunk.get("backtrack", {}).get("type") == "done"]
    assert len(done) == 1 and done[0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_openai_clients_see_the_plain_stream_unless_they_ask(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=300, max_retries=0) as client:
        args = dict(
            model="any",
            messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"banned_strings": ["red"]},
        )
        plain = list(client.chat.completions.create(**args))
        assert all(chunk.choices and not (chunk.model_extra or {}).get("backtrack") for chunk in plain)
        extended = list(client.chat.completions.create(**args, stream_options={"include_backtrack": True}))
    plain_text = "".join(c.choices[0].delta.content or "" for c in plain)
    extended_text = "".join(c.choices[0].delta.content or "" for c in extended if c.choices)
    assert plain_text == extended_text
    kinds = {c.model_extra["backtrack"]["type"] for c in extended if (c.model_extra or {}).get("backtrack")}
    assert {"final", "done"} <= kinds


def test_candidates_replay_the_strategy_and_validate_their_input(server, llama_provider):
    tokens = llama_provider.encode(" the capital of the country", add_special_tokens=False)
    answer = post(
        server,
        "/v1/backtrack/candidates",
        {"prompt": PROMPT, "tokens": tokens, "banned_strings": ["country"], "top_n": 3},
    ).json()
    assert answer["rewind"]["reason"] == "phrase 'country'" and "country" in answer["rewind"]["text"]
    assert answer["tokens"] == tokens[: answer["rewind"]["position"]] and "country" not in answer["text"]
    assert len(answer["candidates"]) == 3
    assert all("country" not in c["text"] for c in answer["candidates"])
    for body, param in [
        ({"prompt": PROMPT, "tokens": [-1]}, "tokens"),
        ({"prompt": PROMPT, "tokens": [10**7]}, "tokens"),
        ({"prompt": PROMPT, "tokens": "12"}, "tokens"),
        ({"prompt": PROMPT, "tokens": [1] * 5000}, "tokens"),
        ({"prompt": PROMPT, "top_n": 0}, "top_n"),
        ({"prompt": PROMPT, "top_n": 21}, "top_n"),
        ({"prompt": PROMPT, "temperature": -1}, "temperature"),
        ({"tokens": []}, None),
        ({"prompt": PROMPT, "messages": [{"role": "user", "content": "x"}]}, None),
        ({"prompt": PROMPT, "strategy": "nope"}, "strategy"),
        ({"prompt": PROMPT, "strategy": "os.path:join"}, "strategy[0].name"),
        ({"prompt": PROMPT, "strategy": {"name": "NoDigits", "max_bans": "3"}}, "strategy[0].max_bans"),
        ({"prompt": PROMPT, "banned_regex": ["("]}, "banned_regex"),
    ]:
        response = post(server, "/v1/backtrack/candidates", body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["message"] and (param is None or (error["param"] or "").startswith(param)), (body, error)
