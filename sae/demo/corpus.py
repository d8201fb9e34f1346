"""A seeded, English-like demo corpus that this project owns.

The local pipeline and the tests need text with real, repeated structure so that a tiny
language model learns something and an SAE on its residual stream finds features a person
can name (numbers, weekdays, colours, code, quotes, ...). Every sentence here comes from
templates and word lists written for this project: no copied text, no downloads.

Facts are kept consistent across documents (a city always lies in the same country, sums
are always right) so that a model can learn them rather than memorise noise.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator

# --- word lists ----------------------------------------------------------------------------

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
]  # fmt: skip
TENS_WORDS = {
    20: "twenty", 30: "thirty", 40: "forty", 50: "fifty", 60: "sixty", 70: "seventy",
    80: "eighty", 90: "ninety",
}  # fmt: skip

NAMES = [
    "Anna", "Tom", "Lena", "Omar", "Mia", "Jonas", "Priya", "Leo", "Sara", "Ben", "Yuki",
    "Carlos", "Nora", "Felix", "Ada", "Hugo", "Ines", "Kofi", "Rosa", "Ivan",
]  # fmt: skip
ANIMALS = [
    "fox", "rabbit", "owl", "bear", "cat", "dog", "horse", "mouse", "duck", "goat", "wolf",
    "deer", "frog", "turtle", "squirrel", "hedgehog",
]  # fmt: skip
PET_NAMES = ["Pip", "Moss", "Biscuit", "Tiger", "Pebble", "Clover", "Rusty", "Juniper"]
PLACES = [
    "the forest", "the river", "the old mill", "the market", "the village", "the hill",
    "the lake", "the garden", "the castle", "the harbor", "the library", "the bakery",
    "the meadow", "the bridge", "the school", "the cave",
]  # fmt: skip
STORY_OBJECTS = [
    "a golden key", "a red apple", "an old map", "a wooden box", "a silver coin",
    "a blue feather", "a small lamp", "a letter", "a basket of berries", "a broken clock",
    "a green hat", "a shiny stone",
]  # fmt: skip
SIZES = ["small", "big", "tiny", "tall", "young", "old", "quiet", "clever", "brave", "lazy"]
FEELINGS = ["happy", "sad", "tired", "curious", "scared", "proud", "hungry", "excited"]
STORY_VERBS_PAST = [
    "walked", "ran", "climbed", "swam", "hurried", "wandered", "jumped", "sailed",
]  # fmt: skip
TIME_PHRASES = [
    "Every morning", "One evening", "Later that day", "The next morning", "At midnight",
    "After lunch", "Before sunrise", "On a rainy afternoon",
]  # fmt: skip

COLORS = ["red", "blue", "green", "yellow", "grey", "white", "purple", "orange", "pink"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]  # fmt: skip
SKIES = {
    "sunny": "yellow", "cloudy": "grey", "rainy": "grey", "stormy": "dark", "clear": "blue",
    "foggy": "white", "snowy": "white", "windy": "pale",
}  # fmt: skip
WINDS = ["north", "south", "east", "west"]

# (city, country, continent): fixed so that "Lyon is a city in" always ends the same way.
CITIES = [
    ("Paris", "France", "Europe"), ("Lyon", "France", "Europe"),
    ("Berlin", "Germany", "Europe"), ("Munich", "Germany", "Europe"),
    ("Madrid", "Spain", "Europe"), ("Seville", "Spain", "Europe"),
    ("Rome", "Italy", "Europe"), ("Milan", "Italy", "Europe"),
    ("Lisbon", "Portugal", "Europe"), ("Oslo", "Norway", "Europe"),
    ("Warsaw", "Poland", "Europe"), ("Vienna", "Austria", "Europe"),
    ("Tokyo", "Japan", "Asia"), ("Osaka", "Japan", "Asia"),
    ("Seoul", "Korea", "Asia"), ("Delhi", "India", "Asia"), ("Mumbai", "India", "Asia"),
    ("Hanoi", "Vietnam", "Asia"), ("Bangkok", "Thailand", "Asia"),
    ("Cairo", "Egypt", "Africa"), ("Nairobi", "Kenya", "Africa"),
    ("Lagos", "Nigeria", "Africa"), ("Accra", "Ghana", "Africa"),
    ("Lima", "Peru", "America"), ("Bogota", "Colombia", "America"),
    ("Toronto", "Canada", "America"), ("Chicago", "America", "America"),
    ("Mexico City", "Mexico", "America"), ("Sydney", "Australia", "Oceania"),
    ("Auckland", "Zealand", "Oceania"),
]  # fmt: skip
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome",
    "Portugal": "Lisbon", "Norway": "Oslo", "Poland": "Warsaw", "Austria": "Vienna",
    "Japan": "Tokyo", "Korea": "Seoul", "India": "Delhi", "Vietnam": "Hanoi",
    "Thailand": "Bangkok", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima",
    "Colombia": "Bogota", "Ghana": "Accra",
}  # fmt: skip
CITY_ADJECTIVES = ["busy", "famous", "large", "beautiful", "old", "modern", "sunny", "quiet"]

# (dish, ingredients): each ingredient has a unit that suits it.
INGREDIENTS = {
    "flour": "cups", "sugar": "spoons", "butter": "grams", "milk": "cups", "eggs": "",
    "salt": "pinches", "rice": "cups", "water": "cups", "tomatoes": "", "onions": "",
    "carrots": "", "potatoes": "", "cheese": "grams", "honey": "spoons", "oil": "spoons",
    "garlic": "cloves", "lemons": "", "beans": "cups", "apples": "", "pepper": "pinches",
}  # fmt: skip
DISHES = {
    "apple cake": ["flour", "sugar", "butter", "eggs", "apples", "milk"],
    "tomato soup": ["tomatoes", "onions", "garlic", "oil", "salt", "water"],
    "vegetable stew": ["carrots", "potatoes", "onions", "beans", "water", "salt", "pepper"],
    "honey bread": ["flour", "honey", "milk", "butter", "salt"],
    "lemon rice": ["rice", "lemons", "water", "oil", "salt"],
    "cheese pie": ["flour", "cheese", "eggs", "butter", "milk", "pepper"],
    "bean salad": ["beans", "tomatoes", "onions", "oil", "lemons", "salt"],
    "potato pancakes": ["potatoes", "eggs", "flour", "onions", "oil", "salt"],
}  # fmt: skip
COOK_VERBS = ["Mix", "Stir", "Chop", "Add", "Whisk", "Pour", "Slice", "Combine"]
COOK_METHODS = [
    ("Bake", "in the oven"), ("Boil", "in a large pot"), ("Fry", "in a pan"),
    ("Simmer", "on low heat"), ("Roast", "in the oven"),
]  # fmt: skip

CODE_NOUNS = [
    "count", "total", "items", "name", "value", "index", "price", "score", "size", "result",
    "user", "data", "line", "word", "number",
]  # fmt: skip
CODE_FUNCS = [
    "add", "scale", "clean", "parse", "load", "save", "check", "merge", "split", "render",
]  # fmt: skip

SPEECH_VERBS = ["said", "asked", "replied", "whispered", "shouted", "answered", "laughed"]
QUESTIONS = [
    "Where is the {obj}?", "Did you see the {obj}?", "Can you help me find the {obj}?",
    "Who took the {obj}?", "Is the {obj} in {place}?",
]  # fmt: skip
ANSWERS = [
    "It is in {place}.", "I think {name} has it.", "I saw it near {place}.",
    "No, I did not see it.", "Let us look in {place} together.", "Ask {name}, not me.",
]  # fmt: skip
REMARKS = [
    "That is strange.", "We should go now.", "I am {feeling} today.", "Thank you, {name}.",
    "It is too late.", "Come with me.", "Be careful!", "What a {size} surprise!",
]  # fmt: skip
DIALOGUE_OBJECTS = ["key", "map", "book", "ticket", "lamp", "letter", "coin", "box", "ball"]

GENRES = ("story", "arithmetic", "weather", "recipe", "code", "geography", "dialogue")


# --- helpers -------------------------------------------------------------------------------


def number_to_words(n: int) -> str:
    """English words for 0..999, so arithmetic sentences pair digits with words."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n <= 20:
        return NUMBER_WORDS[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS_WORDS[tens * 10] + ("" if ones == 0 else "-" + NUMBER_WORDS[ones])
    hundreds, rest = divmod(n, 100)
    head = NUMBER_WORDS[hundreds] + " hundred"
    return head if rest == 0 else head + " and " + number_to_words(rest)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _word_count(parts: list[str]) -> int:
    return sum(len(p.split()) for p in parts)


def _fill(
    rng: random.Random, sentence_fn: Callable[[], str], min_words: int, max_words: int
) -> list[str]:
    """Sentences from sentence_fn until the document reaches a random length in range."""
    target = rng.randint(min_words, max_words)
    parts: list[str] = []
    while _word_count(parts) < target:
        parts.append(sentence_fn())
    return parts


# --- genres --------------------------------------------------------------------------------


def _story(rng: random.Random) -> str:
    animal = rng.choice(ANIMALS)
    hero = rng.choice(PET_NAMES)
    friend = rng.choice(NAMES)
    home = rng.choice(PLACES)
    size, color = rng.choice(SIZES), rng.choice(COLORS)
    opening = (
        f"Once upon a time, {_article(size)} {size} {color} {animal} named {hero} "
        f"lived near {home}."
    )

    def sentence() -> str:
        kind = rng.randrange(6)
        place = rng.choice(PLACES)
        if kind == 0:
            return f"{rng.choice(TIME_PHRASES)}, {hero} {rng.choice(STORY_VERBS_PAST)} to {place}."
        if kind == 1:
            return f"There {hero} found {rng.choice(STORY_OBJECTS)}."
        if kind == 2:
            return f"{hero} met {friend}, who was {rng.choice(FEELINGS)}."
        if kind == 3:
            return f'"Hello, {hero}," said {friend}. "Let us go to {place}."'
        if kind == 4:
            return f"The {animal} felt {rng.choice(FEELINGS)} and sat down by {place}."
        return f"{friend} and the {animal} {rng.choice(STORY_VERBS_PAST)} home together."

    body = _fill(rng, sentence, 30, 150)
    ending = f"In the end, {hero} the {animal} was {rng.choice(FEELINGS)}. The end."
    return " ".join([opening, *body, ending])


def _arithmetic_fact(rng: random.Random) -> str:
    op = rng.randrange(3)
    if op == 0:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        c, word, sym = a + b, "plus", "+"
    elif op == 1:
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
        c, word, sym = a - b, "minus", "-"
    else:
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        c, word, sym = a * b, "times", "*"
    style = rng.randrange(3)
    if style == 0:
        return f"{_cap(number_to_words(a))} {word} {number_to_words(b)} is {number_to_words(c)}. {a} {sym} {b} = {c}."  # noqa: E501
    if style == 1:
        return f"{a} {sym} {b} = {c}."
    return f"What is {number_to_words(a)} {word} {number_to_words(b)}? The answer is {c}."


def _arithmetic(rng: random.Random) -> str:
    intro = rng.choice(
        ["Math practice.", "Let us count.", "Arithmetic lesson.", "Numbers for today."]
    )
    parts = _fill(rng, lambda: _arithmetic_fact(rng), 30, 120)
    if rng.random() < 0.5:
        start = rng.randint(1, 50)
        step = rng.randint(1, 5)
        seq = [start + i * step for i in range(rng.randint(5, 10))]
        parts.append("Count by " + number_to_words(step) + ": " + ", ".join(map(str, seq)) + ".")
    return " ".join([intro, *parts])


def _weather(rng: random.Random) -> str:
    city, country, _ = rng.choice(CITIES)
    day = rng.randrange(len(WEEKDAYS))
    month = rng.choice(MONTHS)
    lines = [f"Weather report for {WEEKDAYS[day]}, {rng.randint(1, 28)} {month}, in {city}."]

    def sentence_for(offset: int) -> str:
        sky = rng.choice(list(SKIES))
        temp = rng.randint(-5, 35)
        name = WEEKDAYS[(day + offset) % 7]
        when = "Today" if offset == 0 else f"On {name}"
        unit = "degree" if abs(temp) == 1 else "degrees"
        return (
            f"{when} the sky will be {sky} and {SKIES[sky]}. "
            f"The temperature is {temp} {unit}, that is {number_to_words(abs(temp))} "
            f"{unit} {'below' if temp < 0 else 'above'} zero. "
            f"The wind comes from the {rng.choice(WINDS)} at {rng.randint(2, 60)} km per hour."
        )

    for offset in range(rng.randint(1, 4)):
        lines.append(sentence_for(offset))
    if rng.random() < 0.6:
        lines.append(
            f"People in {country} should wear {rng.choice(COLORS)} coats and carry umbrellas."
        )
    return " ".join(lines)


def _quantity(rng: random.Random, ingredient: str) -> str:
    unit = INGREDIENTS[ingredient]
    if unit == "grams":
        return f"{rng.choice([50, 100, 150, 200, 250, 500])} grams of {ingredient}"
    n = rng.randint(1, 6)
    if not unit:
        return f"{n} {ingredient}"
    unit = unit[:-1] if n == 1 else unit  # "1 cup", "2 cups"
    return f"{n} {unit} of {ingredient}"


def _recipe(rng: random.Random) -> str:
    dish = rng.choice(list(DISHES))
    items = DISHES[dish]
    serves = rng.randint(2, 8)
    lines = [f"Recipe for {dish}. Serves {serves}.", "You will need:"]
    lines += [f"- {_quantity(rng, item)}." for item in items]
    verb_list = list(COOK_VERBS)
    rng.shuffle(verb_list)
    for step, verb in enumerate(verb_list[: rng.randint(2, 5)], start=1):
        a, b = rng.sample(items, 2)
        lines.append(f"Step {step}: {verb} the {a} with the {b}.")
    method, where = rng.choice(COOK_METHODS)
    minutes = rng.choice([10, 15, 20, 25, 30, 40, 45, 60])
    lines.append(f"{method} {where} for {minutes} minutes. Serve warm.")
    return "\n".join(lines)


def _code(rng: random.Random) -> str:
    lines: list[str] = []
    for _ in range(rng.randint(2, 5)):
        func = rng.choice(CODE_FUNCS) + "_" + rng.choice(CODE_NOUNS)
        args = rng.sample(CODE_NOUNS, rng.randint(1, 3))
        lines.append(f"def {func}({', '.join(args)}):")
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(f"    {args[0]} = {args[0]} + {rng.randint(1, 9)}")
            lines.append(f"    return {args[0]}")
        elif kind == 1:
            lines.append(f"    for {args[0]} in range({rng.randint(2, 20)}):")
            lines.append(f"        print({args[0]})")
            lines.append("    return None")
        elif kind == 2:
            lines.append(f"    if {args[0]} > {rng.randint(0, 100)}:")
            lines.append(f'        return "{rng.choice(["big", "large", "high"])}"')
            lines.append(f'    return "{rng.choice(["small", "low", "tiny"])}"')
        else:
            lines.append(f"    result = [{args[0]} * {rng.randint(2, 5)} for {args[0]} in data]")
            lines.append("    return result")
        lines.append("")
    call = rng.choice(CODE_NOUNS)
    lines.append(f"{call} = {rng.randint(0, 99)}")
    lines.append(f"print({call})")
    return "\n".join(lines)


def _geography(rng: random.Random) -> str:
    chosen = rng.sample(CITIES, rng.randint(4, 9))
    lines = [rng.choice(["Cities of the world.", "A list of cities.", "Geography notes."])]
    for city, country, continent in chosen:
        style = rng.randrange(3)
        if style == 0:
            lines.append(f"{city} is a city in {country}.")
        elif style == 1:
            adj = rng.choice(CITY_ADJECTIVES)
            lines.append(f"{city} is {_article(adj)} {adj} city in {country}, in {continent}.")
        else:
            lines.append(f"- {city}, {country}")
    for country in rng.sample(sorted(CAPITALS), rng.randint(1, 3)):
        lines.append(f"The capital of {country} is {CAPITALS[country]}.")
    return "\n".join(lines)


def _dialogue(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    obj = rng.choice(DIALOGUE_OBJECTS)
    lines = [f"{a} and {b} were at {rng.choice(PLACES)}."]
    speakers = [a, b]

    def quote(template: str) -> str:
        return template.format(
            obj=obj,
            place=rng.choice(PLACES),
            name=rng.choice(NAMES),
            feeling=rng.choice(FEELINGS),
            size=rng.choice(SIZES),
        )

    target, turn = rng.randint(30, 120), 0
    while _word_count(lines) < target:
        speaker = speakers[turn % 2]
        pool = QUESTIONS if turn % 2 == 0 else rng.choice([ANSWERS, REMARKS])
        said = quote(rng.choice(pool))
        if said.endswith("."):  # English punctuation: "It is late," said Anna.
            said = said[:-1] + ","
        lines.append(f'"{said}" {rng.choice(SPEECH_VERBS)} {speaker}.')
        turn += 1
    return "\n".join(lines)


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "story": _story,
    "arithmetic": _arithmetic,
    "weather": _weather,
    "recipe": _recipe,
    "code": _code,
    "geography": _geography,
    "dialogue": _dialogue,
}


# --- public API ----------------------------------------------------------------------------


def generate_documents(num_documents: int, seed: int = 0) -> Iterator[str]:
    """Yield num_documents documents; the same seed always gives the same texts."""
    for text, _ in generate_labelled(num_documents, seed):
        yield text


def generate_labelled(num_documents: int, seed: int = 0) -> Iterator[tuple[str, str]]:
    """(text, genre) of each document of `generate_documents`."""
    rng = random.Random(seed)
    for _ in range(num_documents):
        genre = rng.choice(GENRES)
        # One sub-generator per document keeps each document reproducible on its own.
        yield GENERATORS[genre](random.Random(rng.getrandbits(64))), genre


def concepts() -> dict[str, list[str]]:
    """Token-level concepts the corpus uses, for the absorption evaluation: word lists."""
    return {
        "weekday": list(WEEKDAYS),
        "colour": list(COLORS),
        "number": list(NUMBER_WORDS),
        "name": list(NAMES),
    }


def write_labelled_documents(
    uri: str, num_documents: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()
) -> int:
    """A JSONL of {"text", "label": genre} for sparse probing: fresh documents (another seed
    than the corpus's), none of the texts in `exclude` (the training corpus). Returns how many."""
    from sae.io import storage

    lines = [
        json.dumps({"text": text, "label": genre}, ensure_ascii=False)
        for text, genre in generate_labelled(num_documents, seed)
        if text not in exclude
    ]
    storage.write_text(uri, "".join(line + "\n" for line in lines))
    return len(lines)


def shard_name(index: int, num_files: int) -> str:
    return f"demo-{index:05d}-of-{num_files:05d}.jsonl"


def write_demo_corpus(
    out_dir: str, num_documents: int = 4000, num_files: int = 4, seed: int = 0
) -> list[str]:
    """Write the corpus as num_files JSONL shards of {"text": ...}; returns their URIs."""
    if num_files < 1:
        raise ValueError(f"num_files must be at least 1, got {num_files}")
    # Imported here so that generating text never pulls in the cloud storage clients.
    from sae.io import storage

    shards: list[list[str]] = [[] for _ in range(num_files)]
    for i, text in enumerate(generate_documents(num_documents, seed)):
        # Round robin keeps shards the same size and each one a mix of genres.
        shards[i % num_files].append(json.dumps({"text": text}, ensure_ascii=False))
    uris = []
    for index, lines in enumerate(shards):
        uri = storage.join(out_dir, shard_name(index, num_files))
        storage.write_text(uri, "".join(line + "\n" for line in lines))
        uris.append(uri)
    return uris
