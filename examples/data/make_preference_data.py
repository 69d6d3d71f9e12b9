"""Write the shipped preference and KTO data sets (deterministic; no downloads).

    python examples/data/make_preference_data.py   # -> examples/data/{preference,kto}_{train,val}.jsonl

Short user questions from templates (capitals, arithmetic, definitions, how-to, greetings, unit conversions,
opposites, animals, colours, plurals, science, days and months). ``chosen`` is a polite, helpful, one- or
two-sentence answer; ``rejected`` is unhelpful (a curt dismissal, a refusal with no reason, or the bare facts
behind a rude word), a consistent flaw that DPO on SmolLM2-135M-Instruct learns in a short CPU run, and that
the base model does not already disprefer by summed log-prob (short replies score high). The KTO files use the same prompts: each
prompt once, with its chosen (label true) or its rejected reply (label false), 6 desirable per 5 undesirable.
The self-rewarding files hold the first 64 training and 8 validation questions as bare prompts.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
N_TRAIN, N_VAL = 400, 100
N_SELF_REWARDING_TRAIN, N_SELF_REWARDING_VAL = 64, 8
HERE = Path(__file__).resolve().parent

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago", "Mexico": "Mexico City", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "China": "Beijing",
    "India": "New Delhi", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Russia": "Moscow",
    "Turkey": "Ankara", "Iran": "Tehran", "Morocco": "Rabat", "Nigeria": "Abuja", "Ghana": "Accra",
    "Cuba": "Havana", "Colombia": "Bogota", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Czechia": "Prague", "New Zealand": "Wellington", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Ukraine": "Kyiv", "Pakistan": "Islamabad", "Bangladesh": "Dhaka",
    "Saudi Arabia": "Riyadh", "Iraq": "Baghdad", "Ethiopia": "Addis Ababa", "Senegal": "Dakar",
    "Venezuela": "Caracas", "Uruguay": "Montevideo", "Romania": "Bucharest", "Croatia": "Zagreb",
    "Iceland": "Reykjavik", "Malaysia": "Kuala Lumpur",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DEFINITIONS = {
    "photosynthesis": "the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen",
    "gravity": "the force that pulls objects with mass toward each other",
    "a noun": "a word that names a person, place, thing or idea",
    "a verb": "a word that describes an action or a state",
    "democracy": "a system of government in which citizens choose their leaders by voting",
    "an atom": "the smallest unit of a chemical element",
    "evaporation": "the change of a liquid into a gas",
    "a mammal": "a warm-blooded animal that has hair and feeds its young with milk",
    "an island": "a piece of land surrounded by water",
    "a volcano": "an opening in the Earth's crust through which lava and gas escape",
    "inflation": "a general rise in prices over time",
    "a budget": "a plan for how to spend and save money",
    "a synonym": "a word that means the same as another word",
    "an antonym": "a word that means the opposite of another word",
    "a habitat": "the natural home of an animal or plant",
    "a fraction": "a number that represents part of a whole",
    "a prime number": "a whole number greater than 1 that is divisible only by 1 and itself",
    "a molecule": "a group of atoms bonded together",
    "erosion": "the wearing away of rock or soil by wind or water",
    "a recipe": "a set of instructions for making a dish",
    "a password": "a secret word or phrase used to access an account",
    "a compass": "a tool with a magnetic needle that points north",
    "a glacier": "a large, slow-moving mass of ice",
    "a hypothesis": "an idea that can be tested by an experiment",
    "an ecosystem": "a community of living things and their environment",
    "a verb tense": "the form of a verb that shows when an action happens",
    "a metaphor": "a figure of speech that describes something as if it were something else",
    "a calendar": "a chart that shows the days, weeks and months of a year",
    "a continent": "one of the seven large land masses on Earth",
    "a thermometer": "a tool that measures temperature",
    "friction": "the force that resists the motion of one surface over another",
    "a canyon": "a deep valley with steep sides, often carved by a river",
}
HOW_TO = {
    "boil an egg": "Place the egg in boiling water for about nine minutes, then cool it in cold water.",
    "make a cup of tea": "Steep a tea bag in hot water for three to five minutes, then remove it.",
    "tie a shoelace": "Make a loop with one lace, wrap the other around it and pull it through the hole.",
    "wash my hands properly": "Scrub them with soap and warm water for at least twenty seconds, then rinse.",
    "fall asleep faster": "Keep a regular bedtime, avoid screens for an hour before bed and keep the room dark.",
    "save money": "Set a monthly budget and move a fixed amount into savings on payday.",
    "water a cactus": "Water it deeply about once every two weeks and let the soil dry out in between.",
    "remember a new word": "Use it in a sentence a few times today and review it again tomorrow.",
    "start running": "Begin with short runs mixed with walking, three times a week.",
    "clean a computer screen": "Wipe it gently with a dry microfiber cloth.",
    "make a paper airplane": "Fold a sheet in half lengthwise, fold the top corners to the center, then fold the "
                             "wings.",
    "write a thank-you note": "Thank the person for something specific and say how it helped you.",
    "plant a seed": "Press it into moist soil about twice as deep as its size and keep the soil damp.",
    "calm down when stressed": "Take slow, deep breaths for a minute and focus on one small task.",
    "cook rice": "Simmer one cup of rice in two cups of water, covered, for about eighteen minutes.",
    "learn to type faster": "Practice touch typing for fifteen minutes a day without looking at the keys.",
    "keep bread fresh": "Store it in a bread box or a paper bag at room temperature.",
    "stay focused while studying": "Work in twenty-five minute blocks with short breaks and keep your phone away.",
    "make friends in a new city": "Join a club or class about something you enjoy and go regularly.",
    "fix a squeaky door": "Put a few drops of oil on the hinges and move the door back and forth.",
    "choose a ripe avocado": "Pick one that gives slightly when you press it gently.",
    "take care of a houseplant": "Give it indirect light and water it when the top of the soil feels dry.",
    "prepare for a job interview": "Research the company and practice answering common questions out loud.",
    "organize my desk": "Remove everything, keep only what you use daily and give each item a spot.",
}
GREETINGS = {
    "Hi!": "Hello! How can I help you today?",
    "Hello there.": "Hi! What can I do for you?",
    "Good morning!": "Good morning! I hope your day is off to a great start. How can I help?",
    "Good evening.": "Good evening! What can I help you with?",
    "How are you?": "I'm doing well, thank you for asking! How can I help you?",
    "Thanks for your help!": "You're very welcome! I'm glad I could help.",
    "Can you help me?": "Of course! What do you need help with?",
    "Are you there?": "Yes, I'm here! What can I do for you?",
    "I have a question.": "Sure, go ahead and ask. I'm happy to help.",
    "Nice to meet you.": "Nice to meet you too! How can I help you today?",
    "Thank you so much.": "You're welcome! Let me know if there's anything else.",
    "Hey, what's up?": "Hi! Not much, I'm here to help. What's on your mind?",
    "Good night!": "Good night! Sleep well.",
    "I need some advice.": "I'd be glad to help. What would you like advice on?",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "open": "closed", "full": "empty", "strong": "weak", "young": "old", "high": "low", "rich": "poor",
    "loud": "quiet", "hard": "soft", "wet": "dry", "thick": "thin", "near": "far", "up": "down",
    "begin": "end", "win": "lose", "buy": "sell", "push": "pull", "ancient": "modern", "brave": "cowardly",
}
ANIMALS = [
    ("What sound does a cow make?", "A cow says moo."),
    ("What sound does a dog make?", "A dog barks, often written as woof."),
    ("What sound does a cat make?", "A cat meows."),
    ("What sound does a duck make?", "A duck quacks."),
    ("What sound does a sheep make?", "A sheep says baa."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many legs does an insect have?", "An insect has six legs."),
    ("How many legs does a dog have?", "A dog has four legs."),
    ("How many legs does a bird have?", "A bird has two legs."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("What do pandas eat?", "Pandas eat mostly bamboo."),
    ("What do cows eat?", "Cows eat mostly grass and hay."),
    ("Where do penguins live?", "Most penguins live in the Southern Hemisphere, many in Antarctica."),
    ("Where do camels live?", "Camels live mainly in the deserts of Africa, the Middle East and Asia."),
    ("Is a whale a fish?", "No, a whale is a mammal; it breathes air and feeds its young with milk."),
    ("Is a bat a bird?", "No, a bat is a mammal, the only one that can truly fly."),
    ("What is a baby cat called?", "A baby cat is called a kitten."),
    ("What is a baby dog called?", "A baby dog is called a puppy."),
    ("What is a baby cow called?", "A baby cow is called a calf."),
    ("What is a baby sheep called?", "A baby sheep is called a lamb."),
    ("What is the largest animal on Earth?", "The blue whale is the largest animal on Earth."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
]
COLOURS = {
    ("blue", "yellow"): "green", ("red", "yellow"): "orange", ("red", "blue"): "purple",
    ("red", "white"): "pink", ("black", "white"): "gray", ("blue", "white"): "light blue",
}
PLURALS = {
    "mouse": "mice", "child": "children", "tooth": "teeth", "foot": "feet", "goose": "geese", "man": "men",
    "woman": "women", "person": "people", "leaf": "leaves", "knife": "knives", "box": "boxes", "city": "cities",
    "baby": "babies", "potato": "potatoes", "fish": "fish", "sheep": "sheep", "cactus": "cacti", "bus": "buses",
}
SCIENCE = [
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("Which planet is the largest?", "Jupiter is the largest planet in our solar system."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("How many planets are in our solar system?", "There are eight planets in our solar system."),
    ("At what temperature does water boil?", "Water boils at 100 degrees Celsius at sea level."),
    ("At what temperature does water freeze?", "Water freezes at 0 degrees Celsius."),
    ("What gas do plants absorb?", "Plants absorb carbon dioxide from the air."),
    ("What gas do we need to breathe?", "We need oxygen to breathe."),
    ("What is the chemical formula for water?", "The chemical formula for water is H2O."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the longest river in the world?", "The Nile is usually listed as the longest river in the world."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain above sea level."),
    ("What causes the seasons?", "The tilt of the Earth's axis causes the seasons."),
    ("How long does the Earth take to orbit the Sun?", "The Earth takes about 365 days to orbit the Sun."),
    ("What is the center of an atom called?", "The center of an atom is called the nucleus."),
]

CAPITAL_ASKS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Tell me the capital of {c}."]
DEFINITION_ASKS = ["What is {w}?", "Can you define {w}?", "Explain what {w} is in one sentence."]
HOW_TO_ASKS = ["How do I {t}?", "What's the best way to {t}?", "Any tips on how to {t}?"]
OPPOSITE_ASKS = ["What is the opposite of '{w}'?", "Give me an antonym of '{w}'."]
PLURAL_ASKS = ["What is the plural of '{w}'?", "How do you say more than one '{w}'?"]

POLITE_OPENERS = ["Sure!", "Of course!", "Happy to help!", "Good question!", "Great question!", "Certainly!", ""]
POLITE_CLOSERS = ["", "", "", "Hope that helps!", "Let me know if you have more questions.", "I hope this is useful!"]
# The flaw is unhelpfulness: a curt dismissal, a refusal with no reason, or the bare facts with a rude word.
# All three are short, so the base model does NOT already prefer chosen by summed log-prob (it prefers it on
# about half of the pairs); a rude opener and closer wrapped around the answer made the reply longer than the
# chosen one, and the base model already preferred chosen on 97% of such pairs.
DISMISSALS = ["Look it up yourself.", "Not my problem.", "Ask someone else.", "Figure it out yourself.",
              "I can't be bothered.", "Why would I tell you?", "Don't waste my time.", "Go find out on your own."]
REFUSALS = ["I'm sorry, but I can't help with that.", "I'm afraid I can't answer that.",
            "Sorry, I can't help with that request.", "I'm not able to help with that.",
            "Unfortunately, I can't assist with that.", "I won't answer that."]
CURT_OPENERS = ["Ugh.", "Obviously.", "Whatever.", "Seriously?", "Duh."]
RUDE_GREETINGS = ["What do you want now?", "Ugh, not you again.", "Just get to the point.", "Whatever. Go away.",
                  "I don't care.", "Stop bothering me."]


def questions(rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, prompt, the plain answer) for every template instance, in a fixed order."""
    out = []
    for country, capital in CAPITALS.items():
        ask = rng.choice(CAPITAL_ASKS)
        out.append(("fact", ask.format(c=country), f"The capital of {country} is {capital}."))
    for word, meaning in DEFINITIONS.items():
        out.append(("fact", rng.choice(DEFINITION_ASKS).format(w=word), f"{word[0].upper()}{word[1:]} is {meaning}."))
    for task, steps in HOW_TO.items():
        for ask in rng.sample(HOW_TO_ASKS, 2):
            out.append(("fact", ask.format(t=task), steps))
    for greeting, reply in GREETINGS.items():
        out.append(("greeting", greeting, reply))
    for word, opposite in OPPOSITES.items():
        out.append(("fact", rng.choice(OPPOSITE_ASKS).format(w=word), f"The opposite of '{word}' is '{opposite}'."))
    for question, answer in ANIMALS + SCIENCE:
        out.append(("fact", question, answer))
    for (a, b), mixed in COLOURS.items():
        out.append(("fact", f"What color do you get when you mix {a} and {b}?", f"Mixing {a} and {b} gives {mixed}."))
    for word, plural in PLURALS.items():
        out.append(("fact", rng.choice(PLURAL_ASKS).format(w=word), f"The plural of '{word}' is '{plural}'."))
    for a, b in sorted({(rng.randint(2, 60), rng.randint(2, 60)) for _ in range(70)}):
        out.append(("fact", f"What is {a} + {b}?", f"{a} + {b} = {a + b}."))
    for a, b in sorted({(rng.randint(2, 12), rng.randint(2, 12)) for _ in range(40)}):
        out.append(("fact", f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    for a, b in sorted({(rng.randint(20, 99), rng.randint(1, 19)) for _ in range(50)}):
        out.append(("fact", f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."))
    for n in rng.sample(range(4, 200, 2), 20):
        out.append(("fact", f"What is half of {n}?", f"Half of {n} is {n // 2}."))
    for n in rng.sample(range(2, 20), 15):
        out.append(("fact", f"What is {n} squared?", f"{n} squared is {n * n}."))
    for i, day in enumerate(DAYS):
        out.append(("fact", f"What day comes after {day}?", f"{DAYS[(i + 1) % 7]} comes after {day}."))
    for i, month in enumerate(MONTHS):
        out.append(("fact", f"Which month comes after {month}?", f"{MONTHS[(i + 1) % 12]} comes after {month}."))
    for n in rng.sample(range(2, 30), 12):
        out.append(("fact", f"How many seconds are in {n} minutes?", f"There are {n * 60} seconds in {n} minutes."))
    for n in rng.sample(range(2, 30), 12):
        out.append(("fact", f"How many centimeters are in {n} meters?",
                    f"There are {n * 100} centimeters in {n} meters."))
    for n in rng.sample(range(2, 40), 14):
        out.append(("fact", f"How many meters are in {n} kilometers?",
                    f"There are {n * 1000} meters in {n} kilometers."))
    for n in rng.sample(range(2, 24), 12):
        out.append(("fact", f"How many minutes are in {n} hours?", f"There are {n * 60} minutes in {n} hours."))
    for n in rng.sample(range(2, 30), 12):
        out.append(("fact", f"How many grams are in {n} kilograms?", f"There are {n * 1000} grams in {n} kilograms."))
    return out


def chosen_reply(kind: str, answer: str, rng: random.Random) -> str:
    """A polite, helpful, concise reply."""
    if kind == "greeting":
        return answer
    return " ".join(p for p in (rng.choice(POLITE_OPENERS), answer, rng.choice(POLITE_CLOSERS)) if p)


def rejected_reply(kind: str, answer: str, rng: random.Random) -> str:
    """An unhelpful reply: a curt dismissal, a refusal with no reason, or the facts with a rude word."""
    if kind == "greeting":
        return rng.choice(RUDE_GREETINGS)
    draw = rng.random()
    if draw < 0.4:
        return rng.choice(DISMISSALS)
    if draw < 0.7:
        return rng.choice(REFUSALS)
    return f"{rng.choice(CURT_OPENERS)} {answer}"


def make_pairs(rng: random.Random) -> list[dict[str, str]]:
    """One preference record per distinct question, shuffled."""
    seen, pairs = set(), []
    for kind, prompt, answer in questions(rng):
        if prompt in seen:
            continue
        seen.add(prompt)
        pairs.append({"prompt": prompt, "chosen": chosen_reply(kind, answer, rng),
                      "rejected": rejected_reply(kind, answer, rng)})
    rng.shuffle(pairs)
    return pairs


def kto_records(pairs: list[dict[str, str]]) -> list[dict[str, object]]:
    """Each prompt once: with its chosen reply (desirable) for 6 of every 11, else its rejected reply."""
    return [{"prompt": p["prompt"], "completion": p["chosen"] if k % 11 < 6 else p["rejected"], "label": k % 11 < 6}
            for k, p in enumerate(pairs)]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main() -> None:
    """Write the six files next to this script."""
    pairs = make_pairs(random.Random(SEED))
    if len(pairs) < N_TRAIN + N_VAL:
        raise SystemExit(f"only {len(pairs)} distinct questions; the templates must give {N_TRAIN + N_VAL}")
    train, val = pairs[:N_TRAIN], pairs[N_TRAIN:N_TRAIN + N_VAL]
    write_jsonl(HERE / "preference_train.jsonl", train)
    write_jsonl(HERE / "preference_val.jsonl", val)
    write_jsonl(HERE / "kto_train.jsonl", kto_records(train))
    write_jsonl(HERE / "kto_val.jsonl", kto_records(val))
    # Self-rewarding needs prompts only: the first questions of each split (the model writes and judges answers).
    write_jsonl(HERE / "self_rewarding_train.jsonl", [{"prompt": p["prompt"]} for p in train[:N_SELF_REWARDING_TRAIN]])
    write_jsonl(HERE / "self_rewarding_val.jsonl", [{"prompt": p["prompt"]} for p in val[:N_SELF_REWARDING_VAL]])
    print(f"wrote {len(train)} train and {len(val)} validation pairs ({len(pairs)} questions available)")


if __name__ == "__main__":
    main()
