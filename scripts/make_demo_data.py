#!/usr/bin/env python3
"""Generate a small, deterministic, learnable preference data set for rmtrain demos.

Writes ``OUT/train.jsonl`` and ``OUT/eval.jsonl`` with rows
``{"prompt": str, "chosen": str, "rejected": str}``.

Prompts are user requests built from templates (many topics x phrasings).
``chosen`` is a polite, relevant, helpful answer about the same topic.
``rejected`` is one of several kinds of bad answer:

* ``rude``       -- dismissive / insulting, no help;
* ``off_topic``  -- polite and helpful-looking, but about a *different* topic;
* ``unhelpful``  -- "I don't know"-style non-answers;
* ``lazy``       -- rude opener plus one vague, generic remark.

Lengths are balanced so that length alone does not predict the label: for each
pair a coin flip decides whether the rejected answer must be the longer one
(measured in words), and the pair is resampled until it agrees.  Texts are
kept short (well under 80 tokens for prompt + answer).  Eval rows never
duplicate train rows.  Standard library only.

Usage: python scripts/make_demo_data.py --out data/demo [--train 1200] [--eval 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# topic -> (list of tasks phrased as verb phrases, list of helpful tips)
TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "rice": (
        ["cook fluffy rice", "make rice on the stove", "stop my rice from getting sticky"],
        [
            "Rinse the rice in cold water until it runs clear.",
            "Use about one and a half cups of water per cup of rice.",
            "Simmer it covered on low heat for around fifteen minutes.",
            "Let it rest with the lid on for five minutes before fluffing.",
        ],
    ),
    "sleep": (
        ["sleep better at night", "fall asleep faster", "fix my sleep schedule"],
        [
            "Go to bed and wake up at the same time every day.",
            "Avoid screens and bright light for an hour before bed.",
            "Keep your bedroom cool, dark and quiet.",
            "Skip caffeine in the afternoon and evening.",
        ],
    ),
    "running": (
        ["start running as a beginner", "train for my first 5k", "run without getting tired so fast"],
        [
            "Start with short intervals of running and walking.",
            "Keep an easy pace where you can still hold a conversation.",
            "Increase your weekly distance by no more than ten percent.",
            "Wear comfortable shoes and rest between running days.",
        ],
    ),
    "python": (
        ["learn Python programming", "read a file in Python", "debug my Python script"],
        [
            "Work through small exercises and run your code often.",
            "Use a with statement and open() to read files safely.",
            "Read the error traceback from the bottom line upward.",
            "Add print statements or use a debugger to inspect variables.",
        ],
    ),
    "budget": (
        ["make a monthly budget", "save more money each month", "track my spending"],
        [
            "List your income and all fixed expenses first.",
            "Set aside savings right after payday, before spending.",
            "Write down every purchase for a month to see patterns.",
            "Cancel subscriptions you no longer use.",
        ],
    ),
    "plants": (
        ["keep my houseplants alive", "water my plants properly", "help a plant with yellow leaves"],
        [
            "Water only when the top inch of soil feels dry.",
            "Make sure the pot has drainage holes.",
            "Place the plant where it gets bright, indirect light.",
            "Yellow leaves often mean too much water, so cut back.",
        ],
    ),
    "interview": (
        ["prepare for a job interview", "answer interview questions well", "calm my nerves before an interview"],
        [
            "Research the company and the role before the day.",
            "Practice answers using short stories about real situations.",
            "Prepare two or three questions to ask the interviewer.",
            "Take slow, deep breaths and arrive a little early.",
        ],
    ),
    "bike": (
        ["fix a flat bike tire", "maintain my bicycle", "adjust my bike brakes"],
        [
            "Remove the wheel and use tire levers to take off the tire.",
            "Find the hole in the tube and patch it or replace the tube.",
            "Keep the chain clean and lightly oiled.",
            "Tighten the brake cable until the pads grip firmly.",
        ],
    ),
    "spanish": (
        ["learn Spanish quickly", "practice Spanish speaking", "remember Spanish vocabulary"],
        [
            "Study for fifteen minutes every day instead of cramming.",
            "Use flashcards with spaced repetition for new words.",
            "Talk with a language partner or tutor each week.",
            "Watch shows in Spanish with Spanish subtitles.",
        ],
    ),
    "coffee": (
        ["brew better coffee at home", "make pour-over coffee", "make my coffee less bitter"],
        [
            "Use freshly ground beans and weigh them.",
            "Try about fifteen grams of water for each gram of coffee.",
            "Use water just off the boil, not fully boiling.",
            "A coarser grind or shorter brew time reduces bitterness.",
        ],
    ),
    "stress": (
        ["manage stress at work", "relax after a long day", "deal with feeling overwhelmed"],
        [
            "Break big tasks into small steps and do one at a time.",
            "Take short breaks and go for a walk outside.",
            "Try a few minutes of slow breathing or meditation.",
            "Talk to a friend or a professional about how you feel.",
        ],
    ),
    "email": (
        ["write a professional email", "ask my boss for a day off by email", "follow up on an email politely"],
        [
            "Use a clear subject line that states the purpose.",
            "Keep the message short and put the request first.",
            "Close with a polite thank you and your name.",
            "Wait a few days, then send a brief, friendly reminder.",
        ],
    ),
    "car": (
        ["check my car's oil", "make my car battery last longer", "prepare my car for winter"],
        [
            "Park on level ground and check the dipstick when the engine is cool.",
            "Avoid many short trips and keep the terminals clean.",
            "Check tire pressure and switch to winter tires if needed.",
            "Top up antifreeze and windshield washer fluid.",
        ],
    ),
    "bread": (
        ["bake bread at home", "make my bread rise more", "bake a simple sourdough"],
        [
            "Knead the dough until it is smooth and stretchy.",
            "Let it rise somewhere warm until it doubles in size.",
            "Check that your yeast is fresh and active.",
            "Bake until the loaf sounds hollow when tapped.",
        ],
    ),
    "guitar": (
        ["learn guitar chords", "tune my guitar", "play guitar without sore fingers"],
        [
            "Start with easy chords like G, C, D and E minor.",
            "Use a clip-on tuner and tune each string slowly.",
            "Practice a little every day so your fingertips toughen up.",
            "Press the strings just behind the frets.",
        ],
    ),
    "dog": (
        ["train my puppy to sit", "stop my dog from pulling on the leash", "house-train a new dog"],
        [
            "Reward the behavior you want with a treat right away.",
            "Keep training sessions short and end on a success.",
            "Stop walking when the leash gets tight and continue when it is loose.",
            "Take the dog outside after meals and after naps.",
        ],
    ),
    "study": (
        ["study for exams effectively", "focus while studying", "remember what I read"],
        [
            "Test yourself instead of just rereading your notes.",
            "Study in blocks of about twenty-five minutes with short breaks.",
            "Put your phone in another room while you work.",
            "Explain the material out loud in your own words.",
        ],
    ),
    "laundry": (
        ["remove a coffee stain from a shirt", "wash clothes without shrinking them", "get rid of musty towel smell"],
        [
            "Blot the stain and rinse it with cold water from the back.",
            "Wash delicate clothes in cold water and air dry them.",
            "Run towels with a cup of white vinegar, then wash again.",
            "Do not overload the machine so clothes rinse properly.",
        ],
    ),
    "resume": (
        ["write a good resume", "make my resume stand out", "describe my experience on a resume"],
        [
            "Keep it to one page if you have less than ten years of experience.",
            "Start each bullet with a strong action verb.",
            "Show results with numbers where you can.",
            "Tailor the resume to each job description.",
        ],
    ),
    "painting": (
        ["paint a room", "get clean lines when painting walls", "choose paint for a bedroom"],
        [
            "Clean the walls and cover the floor before you start.",
            "Use painter's tape and remove it while the paint is still wet.",
            "Apply two thin coats rather than one thick coat.",
            "A matte or eggshell finish works well in bedrooms.",
        ],
    ),
    "travel": (
        ["pack light for a trip", "find cheap flights", "avoid jet lag"],
        [
            "Pick clothes that mix and match and roll them tightly.",
            "Compare prices on several days and book a few weeks ahead.",
            "Shift your sleep toward the new time zone before you fly.",
            "Drink plenty of water and get daylight after you land.",
        ],
    ),
    "password": (
        ["create a strong password", "keep my accounts secure", "manage many passwords"],
        [
            "Use a long passphrase of several random words.",
            "Turn on two-factor authentication wherever possible.",
            "Use a password manager so every password is unique.",
            "Never reuse the password from your email account.",
        ],
    ),
    "garden": (
        ["start a vegetable garden", "grow tomatoes", "improve my garden soil"],
        [
            "Choose a spot that gets at least six hours of sun.",
            "Start with easy crops like lettuce, beans and tomatoes.",
            "Water deeply at the base of the plants in the morning.",
            "Mix compost into the soil every season.",
        ],
    ),
    "public_speaking": (
        ["give a good presentation", "get over my fear of public speaking", "remember my speech"],
        [
            "Rehearse out loud several times, ideally in front of a friend.",
            "Use short notes with key points instead of a full script.",
            "Speak slowly and pause after important points.",
            "Remember that the audience wants you to do well.",
        ],
    ),
    "smoothie": (
        ["make a healthy smoothie", "make a smoothie without bananas", "make a protein smoothie"],
        [
            "Blend a cup of frozen fruit with a cup of milk or yogurt.",
            "Add a handful of spinach for extra nutrients.",
            "Use mango or avocado for creaminess instead of banana.",
            "Add Greek yogurt or peanut butter for more protein.",
        ],
    ),
    "posture": (
        ["improve my posture", "stop back pain from sitting", "set up my desk ergonomically"],
        [
            "Keep your screen at eye level and your feet flat on the floor.",
            "Stand up and stretch for a minute every half hour.",
            "Strengthen your core and upper back with simple exercises.",
            "Adjust your chair so your knees are level with your hips.",
        ],
    ),
}

PROMPT_TEMPLATES = [
    "How do I {task}?",
    "How can I {task}?",
    "Can you help me {task}?",
    "What's the best way to {task}?",
    "Any tips on how to {task}?",
    "I want to {task}. Where should I start?",
    "Please explain how to {task}.",
    "I'm struggling to {task}. Any advice?",
    "Could you tell me how to {task}?",
    "What should I do to {task}?",
    "Give me some advice to {task}.",
    "My friend asked me how to {task} and I had no idea. What would you say?",
]

OPENERS = [
    "Sure, happy to help!",
    "Great question.",
    "Of course!",
    "Good idea to ask.",
    "Here are a few tips.",
    "Absolutely.",
    "",
    "",
]
CLOSERS = [
    "Good luck!",
    "Hope this helps.",
    "Let me know if you have more questions.",
    "You've got this.",
    "",
    "",
    "",
]

RUDE = [
    "Figure it out yourself.",
    "That's a stupid question.",
    "Why would I waste my time on this?",
    "Honestly, nobody cares.",
    "Just search it, I'm not your servant.",
    "Ugh, stop bothering me with this.",
    "Anyone could answer that, so ask someone else.",
    "This is boring and so are you.",
    "Go away.",
    "Seriously? Learn to do basic things on your own.",
    "I have better things to do than explain this to you.",
    "What a pointless thing to ask about.",
]
UNHELPFUL = [
    "I don't know.",
    "I'm not sure about that.",
    "No idea, sorry.",
    "I can't really say.",
    "That depends on a lot of things, hard to tell.",
    "Maybe, maybe not.",
    "I have never thought about it.",
    "It's complicated and I can't explain it.",
    "You could look it up somewhere, I guess.",
    "There are many opinions on this and I don't have one.",
    "Hmm, that's a tricky one.",
    "Sorry, I can't help with that.",
]
VAGUE = [
    "Just do it better.",
    "Try harder, that's all.",
    "It works out eventually, whatever.",
    "Do what everyone else does.",
    "It's not that deep.",
]

REJECT_KINDS = ["rude", "off_topic", "unhelpful", "lazy"]


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _words(text: str) -> int:
    return len(text.split())


def make_prompt(rng: random.Random, topic: str) -> str:
    task = rng.choice(TOPICS[topic][0])
    return rng.choice(PROMPT_TEMPLATES).format(task=task)


def make_helpful(rng: random.Random, topic: str, n_tips: int) -> str:
    tips = rng.sample(TOPICS[topic][1], n_tips)
    return _join(rng.choice(OPENERS), *tips, rng.choice(CLOSERS))


def make_rejected(rng: random.Random, topic: str, kind: str) -> str:
    if kind == "rude":
        return _join(*rng.sample(RUDE, rng.randint(1, 4)))
    if kind == "unhelpful":
        return _join(*rng.sample(UNHELPFUL, rng.randint(1, 4)))
    if kind == "lazy":
        return _join(*rng.sample(RUDE, rng.randint(1, 2)), rng.choice(VAGUE))
    if kind == "off_topic":
        other = rng.choice([t for t in TOPICS if t != topic])
        return make_helpful(rng, other, rng.randint(1, 3))
    raise ValueError(kind)


def make_row(rng: random.Random) -> tuple[dict, str]:
    """One preference row plus its rejected kind; lengths balanced by a coin flip."""
    topic = rng.choice(sorted(TOPICS))
    prompt = make_prompt(rng, topic)
    kind = rng.choice(REJECT_KINDS)
    want_rejected_longer = rng.random() < 0.5
    for _ in range(200):
        chosen = make_helpful(rng, topic, rng.randint(1, 3))
        rejected = make_rejected(rng, topic, kind)
        lc, lr = _words(chosen), _words(rejected)
        if lc != lr and (lr > lc) == want_rejected_longer:
            break
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, kind


def make_split(rng: random.Random, n: int, exclude: set) -> tuple[list[dict], list[str]]:
    rows, kinds, seen = [], [], set(exclude)
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could not generate {n} unique rows")
        row, kind = make_row(rng)
        key = (row["prompt"], row["chosen"], row["rejected"])
        if key in seen:
            continue
        seen.add(key)
        rows.append(row)
        kinds.append(kind)
    return rows, kinds


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--train", type=int, default=1200, help="number of train rows")
    ap.add_argument("--eval", type=int, default=300, help="number of eval rows")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, train_kinds = make_split(random.Random(f"train-{args.seed}"), args.train, set())
    train_keys = {(r["prompt"], r["chosen"], r["rejected"]) for r in train}
    evals, eval_kinds = make_split(random.Random(f"eval-{args.seed}"), args.eval, train_keys)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)

    rows = train + evals
    kinds = train_kinds + eval_kinds
    longer_rej = sum(_words(r["rejected"]) > _words(r["chosen"]) for r in rows) / max(1, len(rows))
    max_words = max(_words(r["prompt"]) + max(_words(r["chosen"]), _words(r["rejected"])) for r in rows)
    mix = " ".join(f"{k}={kinds.count(k)}" for k in REJECT_KINDS)
    print(
        f"wrote {len(train)} train + {len(evals)} eval rows to {out} (seed {args.seed}); "
        f"rejected longer in {longer_rej:.1%} of pairs; rejected kinds: {mix}; "
        f"max prompt+answer words: {max_words}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
