"""HumanGuidanceStrategy: you pick every token from a terminal menu, and can go back."""

from __future__ import annotations

import sys
from typing import Callable, List, Optional, Tuple

import numpy as np

from ..provider.base_provider import BaseProvider
from .base_strategy import BaseStrategy

Option = Tuple[str, Optional[float]]  # (label, probability); probability None: the "Go back" entry
Chooser = Callable[[str, List[Option]], int]  # (text so far, options) -> index of the chosen option

GO_BACK = "Go back"


class HumanGuidanceStrategy(BaseStrategy):
    """Shows the text so far and the ``top_k`` candidate tokens with their probabilities; the
    user picks the next token, or "Go back" to remove the last one.

    top_k: how many candidates the menu lists (among those the sampler's filters kept, so use
        temperature > 0 and a sampler top_k at least this large to see them all).
    min_autopass: when the most likely candidate's probability is at least this, it is taken
        without asking. 1.0 (default) asks at every step (unless only one candidate is left);
        0 never asks, which is greedy decoding.
    choose: ``choose(text, options) -> index`` replaces the curses menu (for tests, a GUI, a
        script). ``options`` is a list of ``(label, probability)``, most likely first, ending
        with ``("Go back", None)`` when there is a token to remove.

    Since the user may go back to the very start, no token is final until generation ends
    (the keep index stays 0): the text arrives in one piece at the end. The default menu needs
    an interactive terminal; without one it raises RuntimeError rather than waiting for input.
    """

    reads_probs = True

    def __init__(
        self,
        provider: BaseProvider,
        top_k: int = 3,
        min_autopass: float = 1.0,
        choose: Optional[Chooser] = None,
    ):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k!r}")
        self.provider = provider
        self.top_k = top_k
        self.min_autopass = min_autopass
        self.choose: Chooser = choose or curses_menu
        self.reset()

    def reset(self) -> None:
        self._go_back = False

    def get_keep_index(self) -> int:
        return 0

    def on_probs(self, probs: np.ndarray, continuation_tokens: List[int]) -> np.ndarray:
        self._go_back = False
        ids = np.flatnonzero(probs > 0)
        if len(ids) == 0:
            return probs  # nothing to choose from: the sampler reports it
        top = ids[np.argpartition(probs[ids], -self.top_k)[-self.top_k :]] if len(ids) > self.top_k else ids
        top = top[np.argsort(-probs[top], kind="stable")]
        shares = probs[top] / probs[ids].sum()
        if shares[0] >= self.min_autopass:
            index = 0
        else:
            options: List[Option] = [(self._label(int(t)), float(p)) for t, p in zip(top, shares)]
            if continuation_tokens:
                options.append((GO_BACK, None))
            index = self.choose(self.provider.decode(continuation_tokens), options)
            if not 0 <= index < len(options):
                raise ValueError(f"choose returned {index!r}; expected an index in [0, {len(options)})")
        if index == len(top):  # "Go back": let the sampler draw, then remove that token and the one before
            self._go_back = True
            return probs
        chosen = np.zeros_like(probs)
        chosen[top[index]] = 1.0
        return chosen

    def backtrack(self, continuation_tokens: List[int]) -> List[int]:
        if not self._go_back:
            return continuation_tokens
        self._go_back = False
        self.rewind_reason = "the user went back one token"
        return continuation_tokens[:-2]

    def _label(self, token: int) -> str:
        if token in self.provider.eos_token_ids:
            return "[end of text]"
        text = self.provider.decode([token])
        return repr(text) if text else f"[token {token}]"


# --- the terminal menu ---------------------------------------------------------------------------


def menu_key(current: int, key: int, count: int) -> Tuple[int, bool]:
    """One key press in a menu of ``count`` rows with row ``current`` highlighted: returns the
    new highlighted row and whether it was chosen. Up/Down (or k/j) move and wrap around, Enter
    chooses, a digit 1-9 chooses that row directly; other keys do nothing."""
    import curses

    if key in (curses.KEY_UP, ord("k")):
        return (current - 1) % count, False
    if key in (curses.KEY_DOWN, ord("j")):
        return (current + 1) % count, False
    if key in (curses.KEY_ENTER, 10, 13):
        return current, True
    if ord("1") <= key < ord("1") + min(count, 9):
        return key - ord("1"), True
    return current, False


def curses_menu(text: str, options: List[Option]) -> int:
    """The default ``choose``: a full-screen menu under ``text``; returns the chosen index."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise RuntimeError(
            "HumanGuidanceStrategy shows its menu in an interactive terminal, but stdin/stdout is "
            "not a terminal. Run it in a terminal, or pass choose=... to pick tokens another way."
        )
    import curses

    return curses.wrapper(_run_menu, text, options)


def _run_menu(screen, text: str, options: List[Option]) -> int:
    import curses

    try:
        curses.curs_set(0)
    except curses.error:
        pass  # the terminal cannot hide the cursor
    current = 0
    while True:
        _draw(screen, text, options, current)
        current, chosen = menu_key(current, screen.getch(), len(options))
        if chosen:
            return current


def _draw(screen, text: str, options: List[Option], current: int) -> None:
    import curses

    height, width = screen.getmaxyx()
    width = max(width - 2, 1)
    lines = [line[i : i + width] for line in text.split("\n") for i in range(0, max(len(line), 1), width)]
    lines = lines[-max(height - len(options) - 4, 1) :]  # the end of the text, if it is long
    rows = [("Text so far:", curses.A_BOLD)] + [(line, curses.A_NORMAL) for line in lines] + [("", 0)]
    for i, (label, prob) in enumerate(options):
        shown = f"{i + 1}. {label}" + ("" if prob is None else f"  {prob:.2%}")
        rows.append((shown, curses.A_REVERSE if i == current else curses.A_NORMAL))
    rows.append(("Up/Down + Enter or 1-9 to choose, Ctrl-C to quit", curses.A_DIM))
    screen.erase()
    for y, (row, attr) in enumerate(rows[:height]):
        try:
            screen.addnstr(y, 0, row, width, attr)
        except UnicodeEncodeError:
            screen.addnstr(y, 0, row.encode("ascii", "backslashreplace").decode(), width, attr)
        except curses.error:
            pass  # a row that does not fit a tiny terminal
    screen.refresh()
