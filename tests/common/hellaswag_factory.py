"""Rows in HellaSwag's schema (ctx_a, ctx_b, endings, label, activity_label), made up for tests."""

from __future__ import annotations

import json
from pathlib import Path

ACTIVITIES = {
    "Roof shingle removal": ("A man is sitting on a roof.", "he", "starts pulling up roofing on the roof."),
    "Baking cookies": ("A woman mixes flour and sugar in a bowl.", "she", "puts the tray of cookies in the oven."),
    "Washing face": ("A girl leans over the sink.", "she", "splashes water on her face and rinses."),
    "Clean and jerk": ("A lifter grips the heavy bar.", "he", "lifts the bar over his head and drops it."),
}
WRONG = ["eats a sandwich on the couch.", "drives a car into the lake.", "plays the violin in the rain.",
         "reads a book about the stars.", "paints the fence bright green."]


def hellaswag_rows(count: int, string_labels: bool = True, title_every: int = 5) -> list[dict]:
    """``count`` rows cycling through 4 activities; the right ending sits at position i % 4.

    Every ``title_every``-th context carries a WikiHow " [title]" marker, as real HellaSwag does.
    """
    rows = []
    names = list(ACTIVITIES)
    for i in range(count):
        activity = names[i % len(names)]
        ctx_a, ctx_b, right = ACTIVITIES[activity]
        ctx_a = f"Scene {i}. {ctx_a}"  # every context unique, so tests can find a row's source
        if title_every and i % title_every == 0:
            ctx_a = f"{activity} [title] {ctx_a}"
        label = (i // len(names)) % 4
        endings = [WRONG[(i + k) % len(WRONG)] for k in range(3)]
        endings.insert(label, right)
        rows.append({"ind": i, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
                     "ctx": f"{ctx_a} {ctx_b}", "endings": endings, "split": "train",
                     "label": str(label) if string_labels else label})
    return rows


def write_hellaswag_jsonl(path: Path, count: int, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in hellaswag_rows(count, **kwargs)))
    return path
