"""HumanGuidanceStrategy: the choice logic with an injected ``choose``, the menu keys, the
non-terminal error, a real terminal session driven through tmux, and the real model."""

import curses
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from backtrack_sampler import BacktrackSampler, HumanGuidanceStrategy
from backtrack_sampler.provider.fake_provider import FakeProvider
from backtrack_sampler.strategy.human_guidance_strategy import GO_BACK, curses_menu, menu_key

ROOT = Path(__file__).resolve().parents[1]
BOS = [2]
SCORES = {" the": 3.0, " cat": 2.0, " dog": 1.0, "<eos>": -1.0}


def fixed_provider(scores=SCORES):
    """A FakeProvider with the same distribution at every step (other words at -30)."""
    fake = FakeProvider()
    logits = np.full(fake.vocab_size, -30.0, dtype=np.float32)
    for word, score in scores.items():
        logits[fake.ids[word]] = score
    fake.logits_fn = lambda tokens: logits
    return fake


class Script:
    """A ``choose`` that answers from a list and records what it was shown."""

    def __init__(self, *answers):
        self.answers, self.shown = list(answers), []

    def __call__(self, text, options):
        self.shown.append((text, options))
        return self.answers.pop(0)


def words(fake, tokens):
    return [fake.vocab[t] for t in tokens]


def test_user_picks_tokens_and_goes_back():
    fake = fixed_provider()
    script = Script(1, 3, 0, 1, 0)  # " cat", Go back, " the", " cat", " the"
    sampler = BacktrackSampler(fake, HumanGuidanceStrategy(fake, choose=script))
    out = list(sampler.generate(BOS, max_new_tokens=3, seed=0))
    assert words(fake, out) == [" the", " cat", " the"]
    assert script.answers == [] and sampler.stats.rewinds == 1
    assert sampler.stats.events[0].position == 0 and sampler.stats.events[0].reason == "the user went back one token"

    texts = [text for text, _ in script.shown]
    assert texts == ["", " cat", "", " the", " the cat"]
    first, second = script.shown[0][1], script.shown[1][1]
    assert [label for label, _ in first] == ["' the'", "' cat'", "' dog'"]  # no "Go back" at the start
    z = sum(np.exp(s) for s in SCORES.values())
    np.testing.assert_allclose([p for _, p in first], [np.exp(3) / z, np.exp(2) / z, np.exp(1) / z], rtol=1e-5)
    assert second[-1] == (GO_BACK, None) and len(second) == 4


def test_choice_is_honoured_even_when_greedy_would_differ():
    fake = fixed_provider()
    sampler = BacktrackSampler(fake, HumanGuidanceStrategy(fake, top_k=2, choose=lambda text, options: 1))
    assert words(fake, sampler.generate(BOS, max_new_tokens=4, seed=0)) == [" cat"] * 4


def test_nothing_is_final_until_the_end():
    fake = fixed_provider()
    received, seen = [], []

    def choose(text, options):
        seen.append(len(received))
        return 0

    for token in BacktrackSampler(fake, HumanGuidanceStrategy(fake, choose=choose)).generate(BOS, max_new_tokens=4):
        received.append(token)
    assert seen == [0, 0, 0, 0] and len(received) == 4  # the user could still go back to the start


def test_min_autopass_skips_the_menu_for_confident_steps():
    fake = fixed_provider({" the": 3.0, " cat": 1.0})  # p(" the") ~ 0.88
    never = Script()
    sampler = BacktrackSampler(fake, HumanGuidanceStrategy(fake, min_autopass=0.8, choose=never))
    assert words(fake, sampler.generate(BOS, max_new_tokens=3, seed=0)) == [" the"] * 3
    assert never.shown == []
    asked = Script(1, 1)
    sampler = BacktrackSampler(fake, HumanGuidanceStrategy(fake, min_autopass=0.9, choose=asked))
    assert words(fake, sampler.generate(BOS, max_new_tokens=2, seed=0)) == [" cat"] * 2


def test_end_of_text_is_labelled_and_ends_generation():
    fake = fixed_provider({"<eos>": 3.0, " cat": 2.0})
    script = Script(1, 0)
    sampler = BacktrackSampler(fake, HumanGuidanceStrategy(fake, choose=script))
    assert words(fake, sampler.generate(BOS, max_new_tokens=5, seed=0)) == [" cat"]
    assert script.shown[0][1][0][0] == "[end of text]" and sampler.stats.finish_reason == "stop"


def test_bad_choice_and_arguments_are_rejected():
    fake = fixed_provider()
    sampler = BacktrackSampler(fake, HumanGuidanceStrategy(fake, choose=lambda text, options: 3))
    with pytest.raises(ValueError, match="choose returned 3"):  # no "Go back" at the start
        list(sampler.generate(BOS, max_new_tokens=2))
    with pytest.raises(ValueError):
        HumanGuidanceStrategy(fake, top_k=0)


def test_menu_keys():
    assert menu_key(0, curses.KEY_DOWN, 4) == (1, False)
    assert menu_key(3, curses.KEY_DOWN, 4) == (0, False)  # wraps
    assert menu_key(0, curses.KEY_UP, 4) == (3, False)
    assert menu_key(2, ord("k"), 4) == (1, False) and menu_key(2, ord("j"), 4) == (3, False)
    assert menu_key(2, ord("\n"), 4) == (2, True) and menu_key(1, curses.KEY_ENTER, 4) == (1, True)
    assert menu_key(0, ord("4"), 4) == (3, True)
    assert menu_key(0, ord("5"), 4) == (0, False) and menu_key(1, ord("x"), 4) == (1, False)


def test_the_menu_refuses_to_run_without_a_terminal(monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(RuntimeError, match="not a terminal"):
        curses_menu("text", [("' a'", 1.0)])


MENU_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from backtrack_sampler import BacktrackSampler, HumanGuidanceStrategy
    from backtrack_sampler.provider.fake_provider import FakeProvider

    fake = FakeProvider()
    logits = np.full(fake.vocab_size, -30.0, dtype=np.float32)
    for word, score in {" the": 3.0, " cat": 2.0, " dog": 1.0}.items():
        logits[fake.ids[word]] = score
    fake.logits_fn = lambda tokens: logits
    sampler = BacktrackSampler(fake, HumanGuidanceStrategy(fake))
    text = "".join(sampler.generate_text([2], max_new_tokens=3, seed=0))
    with open(sys.argv[1], "w") as out:
        out.write(f"{text!r} rewinds={sampler.stats.rewinds}")
    """
)


def test_without_a_terminal_the_script_fails_fast(tmp_path):
    script = tmp_path / "menu.py"
    script.write_text(MENU_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out")],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode != 0 and "not a terminal" in done.stderr


def tmux_available():
    if shutil.which("tmux"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "tmux"], capture_output=True, timeout=300)
    return shutil.which("tmux") is not None


@pytest.fixture
def tmux():
    """Runs commands in a private tmux server (its own socket), killed afterwards."""
    assert tmux_available(), "tmux is not installed and could not be installed: apt-get install -y tmux"
    socket = f"bt-test-{uuid.uuid4().hex[:8]}"

    def run(*args):
        return subprocess.run(
            ["tmux", "-L", socket, "-f", "/dev/null", *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout

    yield run
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, timeout=30)


def wait_for_screen(tmux, predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        screen = tmux("capture-pane", "-p", "-t", "menu")
        if predicate(screen):
            return screen
        if time.monotonic() > deadline:
            raise AssertionError(f"the menu did not show what was expected; screen:\n{screen}")
        time.sleep(0.2)


def test_real_terminal_menu_through_tmux(tmux, tmp_path):
    script, result = tmp_path / "menu.py", tmp_path / "result"
    script.write_text(MENU_SCRIPT)
    command = f"cd {ROOT} && TERM=xterm {sys.executable} {script} {result} 2> {tmp_path / 'err'}; sleep 60"
    tmux("new-session", "-d", "-s", "menu", "-x", "80", "-y", "24", command)

    def menu(text, go_back):
        def shown(screen):
            lines = screen.splitlines()
            return (
                "Text so far:" in screen
                and f"1. ' the'  {0.6652:.2%}" in screen
                and "3. ' dog'" in screen
                and ("4. Go back" in screen) == go_back
                and (lines[1].strip() == text)
            )

        return shown

    wait_for_screen(tmux, menu("", go_back=False))
    tmux("send-keys", "-t", "menu", "Down", "Enter")  # " cat"
    wait_for_screen(tmux, menu("cat", go_back=True))
    tmux("send-keys", "-t", "menu", "Up", "Enter")  # wraps to the last row: Go back
    wait_for_screen(tmux, menu("", go_back=False))
    tmux("send-keys", "-t", "menu", "Enter")  # " the"
    wait_for_screen(tmux, menu("the", go_back=True))
    tmux("send-keys", "-t", "menu", "2")  # " cat"
    wait_for_screen(tmux, menu("the cat", go_back=True))
    tmux("send-keys", "-t", "menu", "j", "k", "Enter")  # down, up: " the"
    deadline = time.monotonic() + 30
    while not (result.exists() and result.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    errors = (tmp_path / "err").read_text() if (tmp_path / "err").exists() else ""
    assert result.exists(), f"the script did not finish; stderr:\n{errors}"
    assert result.read_text() == "' the cat the' rewinds=1"


@pytest.mark.model
def test_real_model_second_choice_and_go_back(provider):
    prompt = "The capital of France is"
    prompt_tokens = provider.encode(prompt, add_special_tokens=True)
    script = Script(1, 1, 3, 1, 1)  # second, second, Go back (drops the 2nd), second, second
    sampler = BacktrackSampler(provider, HumanGuidanceStrategy(provider, choose=script))
    provider.reset()  # as the replay below: llama.cpp's numbers depend on the chunks that built a cache
    out = list(sampler.generate(prompt, max_new_tokens=3, seed=0))
    assert len(out) == 3 and sampler.stats.rewinds == 1 and script.answers == []
    provider.reset()
    for i, token in enumerate(out):  # each token is the model's second most likely one
        logits = provider.next_logits(prompt_tokens + out[:i])
        assert abs(logits[token] - np.partition(logits, -2)[-2]) < 1e-2
    assert script.shown[3][0] == provider.decode(out[:1])  # after going back, the text is one token shorter
