"""The bundled corpus: stories and chats about a small invented valley, generated from a seed.

No third-party text is copied: every document comes from the templates and tables below, filled
by a local `random.Random(seed)`, so `python -m mmnb.corpus` rebuilds `mmnb/assets/` byte for
byte. The world itself (who lives where, whose pet is whose) is fixed, so facts recur
consistently across stories and chats and a tiny model can pick them up; the seed only decides
which events happen in which order. Only `random.Random`'s documented, version-stable methods
(choice, randint, sample, random) are used.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ASSETS_DIR = Path(__file__).parent / "assets"
PRETRAIN_PATH = ASSETS_DIR / "pretrain.jsonl"
CHAT_PATH = ASSETS_DIR / "chat.jsonl"
DPO_PATH = ASSETS_DIR / "dpo.jsonl"

DEFAULT_NUM_DOCS = 3000  # about 1.4 MB of text
DEFAULT_NUM_CONVERSATIONS = 2000
DEFAULT_NUM_PAIRS = 600


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


@dataclass(frozen=True)
class Person:
    name: str
    sex: str  # "f" or "m": picks the pronouns
    job: str
    home: str
    colour: str  # favourite colour; people in stories wear and like it
    pet: str
    pet_name: str
    food: str
    trait: str
    age: int


@dataclass(frozen=True)
class Place:
    name: str
    mile: int  # position along the valley road; distances are differences of these
    desc: str
    feature: str


# name sex job home colour pet pet_name food trait age
_PEOPLE = """
Mira f baker Oakvale blue cat Pip plums kind 34
Tobin m fisherman Saltmarsh green dog Rufus fish brave 41
Lila f teacher Pinecrest yellow rabbit Clover carrots cheerful 29
Bram m farmer Millbrook brown goat Barley cheese quiet 52
Nell f painter Willowmere purple owl Hoot berries curious 23
Otto m blacksmith Redstone red horse Ember soup strong 47
Pia f gardener Foxhollow pink hen Dotty pears gentle 38
Rolf m miller Millbrook white mouse Crumb bread sleepy 60
Suki f sailor Saltmarsh orange duck Puddle cake clever 31
Wren f librarian Pinecrest grey fox Rusty honey thoughtful 44
Ivo m carpenter Oakvale black dog Pepper apples cheerful 36
Tess f doctor Brightwater green cat Mittens soup calm 50
Juno f shepherd Foxhollow white sheep Woolly bread patient 27
Finn m postman Brightwater blue horse Dash plums busy 33
Hana f potter Willowmere orange frog Lily rice funny 25
Kit m musician Redstone yellow parrot Echo berries lively 19
"""
PEOPLE = tuple(
    Person(n, s, j, h, c, p, pn, f, t, int(a))
    for n, s, j, h, c, p, pn, f, t, a in (line.split() for line in _PEOPLE.strip().splitlines())
)
PLACES = tuple(
    Place(n, int(m), d, f)
    for n, m, d, f in (
        line.split("|")
        for line in """
Oakvale|0|a quiet village by the river|an old stone bridge
Foxhollow|2|a little hamlet at the edge of the forest|a round pond full of frogs
Millbrook|4|a small town with a busy market|a big water mill
Pinecrest|6|a town on a green hill|a tall clock tower
Saltmarsh|9|a fishing village by the sea|a harbour full of boats
Brightwater|11|a town beside a waterfall|a white bridge over the falls
Willowmere|12|a village beside a still lake|a garden of willow trees
Redstone|15|a town built of red rock|a loud forge
""".strip().splitlines()
    )
)
PLACE = {p.name: p for p in PLACES}

COLOURS = _words("red blue green yellow orange purple white black brown grey pink")
OBJECTS = _words(
    "ball kite basket hat scarf boat lamp book cup box bell ribbon key map bucket coat"
)
SPOTS = _words("market river forest bakery school hill meadow library pond garden bridge field")
COUNTABLE = _words("apples pears plums eggs carrots buns nuts cherries shells stones flowers")
TIMES = _words("morning afternoon evening day")
NUMBER_WORDS = _words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
)
SOUNDS = {
    "cat": "meow", "dog": "woof", "cow": "moo", "sheep": "baa", "duck": "quack", "hen": "cluck",
    "owl": "hoo", "horse": "neigh", "goat": "maa", "frog": "ribbit", "mouse": "squeak",
    "pig": "oink", "parrot": "hello", "rabbit": "nothing at all", "fox": "yip",
}  # fmt: skip
PET_ACTIONS = {
    "cat": ["purred by the fire", "chased a ball of string", "slept in the sun all day"],
    "dog": ["barked at a crow", "ran after a stick", "wagged its tail and jumped up"],
    "rabbit": ["hopped across the garden", "ate a crunchy carrot", "dug a hole under the fence"],
    "goat": ["climbed onto the wall", "ate a corner of the washing", "butted the gate open"],
    "owl": ["hooted from the roof", "slept in the barn all day", "flew over the field at night"],
    "horse": ["trotted down the road", "ate a bucket of oats", "neighed at the gate"],
    "hen": ["laid a brown egg", "pecked at the grain", "ran around the yard"],
    "mouse": ["hid in a sack of flour", "nibbled a piece of cheese", "ran along the shelf"],
    "duck": ["swam in the pond", "quacked very loudly", "waddled after the children"],
    "fox": ["curled up by the door", "ran into the woods and back", "sniffed at the basket"],
    "sheep": ["ate the green grass", "stood in the rain", "followed the path home"],
    "frog": ["jumped into the pond", "croaked all night", "sat on a wet stone"],
    "parrot": ["said hello to everyone", "sang a little song", "sat on the window sill"],
}
JOB_ACTIONS = {
    "baker": ["baked fresh bread for the market", "made a plum cake", "sold warm buns"],
    "fisherman": ["caught six silver fish", "mended his nets", "rowed out past the rocks"],
    "teacher": ["taught the children to count", "read a story to the class", "rang the bell"],
    "farmer": ["milked the goats", "planted rows of beans", "fixed the fence by the field"],
    "painter": ["painted the lake at sunrise", "mixed a new colour", "sold a small picture"],
    "blacksmith": ["made a new horseshoe", "mended a broken gate", "kept the fire hot"],
    "gardener": ["planted pink roses", "picked a basket of pears", "pulled up the weeds"],
    "miller": ["ground the wheat into flour", "oiled the big wheel", "filled ten sacks of flour"],
    "sailor": ["sailed around the bay", "tied the ropes tight", "watched the clouds for storms"],
    "librarian": ["sorted the old books", "found a lost map", "read by the window"],
    "carpenter": ["built a new table", "mended the bridge", "carved a wooden duck"],
    "doctor": ["visited a sick child", "made a cup of ginger tea", "wrapped a hurt paw"],
    "shepherd": ["counted the sheep", "led the flock up the hill", "found a lost lamb"],
    "postman": ["brought the letters", "rode to every house", "carried a heavy parcel"],
    "potter": ["made twelve bowls", "painted a blue jug", "fired the kiln"],
    "musician": ["played a happy tune", "tuned the old fiddle", "sang in the square"],
}
# weather: (sky sentences, sentences about what it caused)
WEATHER = {
    "sunny": (
        ["The sun was shining and the sky was clear.", "It was bright and warm in {home}."],
        [
            "Because it was hot, {name} wore {his} {colour} hat.",
            "The sun was warm, so {name} sat under a tree by the {spot}.",
            "{name} took {pet_name} for a long walk in the sunshine.",
            "It was a good day for drying washing, so {name} hung {his} {c} coat outside.",
        ],
    ),
    "rainy": (
        ["Rain fell all {time} long.", "Grey clouds filled the sky and it began to rain."],
        [
            "Because it was raining, {name} took {his} {colour} umbrella.",
            "The path was full of puddles, so {name} wore {his} boots.",
            "{name} stayed inside and read a book about {place}.",
            "The rain made the river rise, so nobody crossed the bridge.",
        ],
    ),
    "windy": (
        ["A strong wind blew across the valley.", "The wind shook the trees in {home}."],
        [
            "It was windy, so {name} flew {his} {colour} kite on the hill.",
            "The wind blew {name}'s hat away, and {he} ran after it.",
            "The wind turned the mill wheel fast, and Rolf was pleased.",
            "Leaves flew everywhere, so {name} swept the step twice.",
        ],
    ),
    "snowy": (
        ["Snow had fallen in the night.", "Everything in {home} was white with snow."],
        [
            "Because it was cold, {name} wore {his} {colour} scarf.",
            "{name} built a snowman with a {c} hat.",
            "The pond was frozen, so {name} did not let {pet_name} walk on it.",
            "{name} made hot soup, because the snow made everyone cold.",
        ],
    ),
    "foggy": (
        ["Thick fog hid the hills.", "It was so foggy that {name} could not see the {spot}."],
        [
            "Because of the fog, {name} walked slowly and carried a lamp.",
            "The boats stayed in the harbour, because the fog was too thick.",
            "{name} got lost in the fog, but {pet_name} found the way home.",
        ],
    ),
    "stormy": (
        ["A storm came over the hills.", "Thunder rolled and the rain came down hard."],
        [
            "Because of the storm, {name} closed the windows and lit the fire.",
            "{pet_name} was afraid of the thunder and hid under the bed.",
            "The storm broke a branch, so {name} asked Ivo to mend the fence.",
        ],
    ),
}


def _pronouns(p: Person) -> dict[str, str]:
    he, him, his = ("she", "her", "her") if p.sex == "f" else ("he", "him", "his")
    return {"he": he, "him": him, "his": his, "He": he.capitalize(), "His": his.capitalize()}


def friend_of(p: Person) -> Person:
    """Each person's best friend is fixed, so stories and chats agree about it."""
    return PEOPLE[(PEOPLE.index(p) + 5) % len(PEOPLE)]


def miles(a: str, b: str) -> int:
    return abs(PLACE[a].mile - PLACE[b].mile)


def residents(place: str) -> list[str]:
    return [p.name for p in PEOPLE if p.home == place]


def and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _num(r: random.Random, n: int) -> str:
    # Numbers appear both as words and as digits, so the model sees both spellings.
    return NUMBER_WORDS[n] if n <= 20 and r.random() < 0.5 else str(n)


def _ctx(r: random.Random, p: Person, q: Person) -> dict[str, Any]:
    ctx: dict[str, Any] = {k: v for k, v in vars(p).items()}
    ctx.update(_pronouns(p))
    ctx.update({f"q_{k}": v for k, v in vars(q).items()})
    ctx.update({f"q_{k}": v for k, v in _pronouns(q).items()})
    ctx.update(
        c=r.choice(COLOURS), obj=r.choice(OBJECTS), spot=r.choice(SPOTS),
        time=r.choice(TIMES), place=r.choice(PLACES).name, things=r.choice(COUNTABLE),
        we="they", We="They", pair=f"{p.name} and {q.name}",
    )  # fmt: skip
    return ctx


def _ev_weather(r: random.Random, ctx: dict[str, Any]) -> list[str]:
    sky, caused = WEATHER[ctx["weather"]]
    return [r.choice(sky).format_map(ctx)] + [s.format_map(ctx) for s in r.sample(caused, 2)]


def _ev_meet(r: random.Random, ctx: dict[str, Any]) -> list[str]:
    lines = [
        "{name} walked to the {spot}. There {he} met {q_name} and {q_his} {q_pet}, {q_pet_name}.",
        '"Hello, {q_name}!" {name} said. "Where are you going?"',
        r.choice([
            '"I am going to {place} to buy some {things}," said {q_name}.',
            '"I am going home to {q_home}," said {q_name}. "I have work to do."',
            '"I am looking for my {c} {obj}," said {q_name}. "Have you seen it?"',
        ]),
        r.choice([
            '"What colour do you like best?" asked {q_name}. "I like {colour} best," said {name}.',
            '"Can I come too?" asked {name}. "Yes, of course," said {q_name}.',
            '"Do you want to play with my {c} ball?" asked {name}. "Yes, please!" said {q_name}.',
            '"How is {pet_name}?" asked {q_name}. "{pet_name} is very well," said {name}.',
        ]),
    ]  # fmt: skip
    return [s.format_map(ctx) for s in lines]


def _ev_count(r: random.Random, ctx: dict[str, Any]) -> list[str]:
    a, b = r.randint(2, 9), r.randint(2, 9)  # from 2: every count takes a plural noun
    name, things, friend = ctx["name"], ctx["things"], ctx["q_name"]
    if r.random() < 0.5:
        total, counter = a + b, ctx["We"]
        out = [
            f"{name} found {_num(r, a)} {things} by the {ctx['spot']}.",
            f"{friend} found {_num(r, b)} more.",
            f"Together {ctx['we']} had {_num(r, total)} {things}.",
        ]
    else:
        total, counter = a, ctx["He"]
        out = [
            f"{name} had {_num(r, a + b)} {things} in a basket.",
            f"{ctx['He']} gave {_num(r, b)} of them to {friend}.",
            f"Now {ctx['he']} had {_num(r, a)} {things} left.",
        ]
    if total <= 6:
        out.append(f"{counter} counted them: {', '.join(NUMBER_WORDS[1 : total + 1])}.")
    return out


def _ev_lost(r: random.Random, ctx: dict[str, Any]) -> list[str]:
    lines = [
        "{name} could not find {his} {c} {obj}.",
        r.choice([
            "{He} looked under the bed and behind the door.",
            "{He} looked in the kitchen and in the garden.",
            "{He} asked {q_name}, but {q_he} had not seen it.",
        ]),
        r.choice([
            "At last, {pet_name} the {pet} found it by the {spot}.",
            "At last {he} found it in {his} own pocket, and {he} laughed.",
            "In the end, {q_name} found it near the {spot} and brought it back.",
        ]),
    ]  # fmt: skip
    return [s.format_map(ctx) for s in lines]


def _ev_pet(r: random.Random, ctx: dict[str, Any]) -> list[str]:
    acts = r.sample(PET_ACTIONS[ctx["pet"]], 2)
    return [
        f"{ctx['pet_name']}, {ctx['name']}'s {ctx['pet']}, {acts[0]}.",
        f"Then it {acts[1]}.",
        f'"{SOUNDS[ctx["pet"]].capitalize()}!" said {ctx["pet_name"]}.',
    ]


def _ev_work(r: random.Random, ctx: dict[str, Any]) -> list[str]:
    a, b = r.sample(JOB_ACTIONS[ctx["job"]], 2)
    return [
        f"{ctx['name']} is a {ctx['job']}, so that {ctx['time']} {ctx['he']} {a}.",
        f"After that, {ctx['he']} {b}.",
    ]


def _ev_gift(r: random.Random, ctx: dict[str, Any]) -> list[str]:
    lines = [
        "{name} gave {q_name} a {q_colour} {obj}, because {q_colour} is {q_his} favourite colour.",
        '"Thank you!" said {q_name}. "It is just what I wanted."',
    ]
    return [s.format_map(ctx) for s in lines]


def _ev_travel(r: random.Random, ctx: dict[str, Any]) -> list[str]:
    dest = r.choice([pl for pl in PLACES if pl.name != ctx["home"]])
    d = miles(ctx["home"], dest.name)
    return [
        f"{ctx['name']} went from {ctx['home']} to {dest.name}, which is {dest.desc}.",
        f"It is {_num(r, d)} miles, so {'it was a long walk' if d > 6 else 'it was a short walk'}.",
        f"In {dest.name} {ctx['he']} saw {dest.feature}.",
    ]


def _ev_meal(r: random.Random, ctx: dict[str, Any]) -> list[str]:
    return [
        "For lunch, {pair} ate {food} and {q_food} by the {spot}.".format_map(ctx),
        r.choice(["It was very good.", "{We} shared it with {pet_name}.".format_map(ctx)]),
    ]


EVENTS = (_ev_meet, _ev_count, _ev_lost, _ev_pet, _ev_work, _ev_gift, _ev_travel, _ev_meal)
OPENINGS = (
    "One {weather} morning, {name} woke up early in {home}.",
    "It was a {weather} {time} in {home}.",
    "{name} the {job} lived in {home} with {his} {pet}, {pet_name}.",
    "Once upon a time, in {home}, there lived a {trait} {job} called {name}.",
)
ENDINGS = (
    "When the sun went down, {name} went home to {home}.",
    "That night, {name} slept well.",
    "It had been a good day.",
    "The end.",
    "{name} smiled. It had been a {weather} day, and a happy one.",
)


def story(r: random.Random, p: Person | None = None, events: int | None = None) -> str:
    """A short story: opening, weather, events (2-4 unless given), ending; a paragraph each.

    `events=1` makes the short form used in chat answers: no weather paragraph, no title.
    """
    p = p or r.choice(PEOPLE)
    q = friend_of(p) if r.random() < 0.4 else r.choice([x for x in PEOPLE if x != p])
    weather = r.choice(list(WEATHER))
    ctx = _ctx(r, p, q) | {"weather": weather}
    paras = [r.choice(OPENINGS).format_map(ctx)]
    if events != 1:
        paras[0] += " " + " ".join(_ev_weather(r, ctx))
    for ev in r.sample(EVENTS, events or r.randint(2, 4)):
        paras.append(" ".join(ev(r, _ctx(r, p, q) | {"weather": weather})))
    paras[-1] += " " + r.choice(ENDINGS).format_map(ctx)
    if events != 1 and r.random() < 0.3:
        paras.insert(0, f"{p.name} and the {ctx['c'].capitalize()} {ctx['obj'].capitalize()}")
    return "\n".join(paras)


def describe_person(r: random.Random, p: Person) -> str:
    pr, f = _pronouns(p), friend_of(p)
    parts = [
        f"{p.name} is a {p.trait} {p.job} who lives in {p.home}.",
        f"{pr['He']} is {p.age} years old.",
        f"{pr['His']} favourite colour is {p.colour}.",
        f"{pr['He']} has a {p.pet} called {p.pet_name}.",
        f"{pr['He']} likes to eat {p.food}.",
        f"{pr['His']} best friend is {f.name}, who lives in {f.home}.",
        f"Yesterday {pr['he']} {r.choice(JOB_ACTIONS[p.job])}.",
    ]
    first, rest = parts[0], parts[1:]
    return " ".join([first] + r.sample(rest, r.randint(3, len(rest))))


def describe_place(r: random.Random, pl: Place) -> str:
    people = residents(pl.name)
    other = r.choice([x for x in PLACES if x != pl])
    parts = [
        f"{pl.name} is {pl.desc}.",
        f"In {pl.name} there is {pl.feature}.",
        f"{and_list(people)} {'lives' if len(people) == 1 else 'live'} there.",
        f"From {pl.name} it is {miles(pl.name, other.name)} miles to {other.name}.",
        r.choice([
            f"Many people visit {pl.name} on market day.",
            f"In winter, snow covers the roofs of {pl.name}.",
            f"The road to {pl.name} is long and winding.",
            f"In spring, the fields around {pl.name} are full of {r.choice(COLOURS)} flowers.",
        ]),
    ]  # fmt: skip
    return " ".join(parts[:2] + r.sample(parts[2:], 3))


def diary(r: random.Random) -> str:
    """A first-person diary entry, signed by its writer."""
    p = r.choice(PEOPLE)
    me = Person("I", "x", p.job, p.home, p.colour, p.pet, p.pet_name, p.food, p.trait, p.age)
    first_person = {"he": "I", "him": "me", "his": "my", "He": "I", "His": "My", "we": "we"}

    def ctx() -> dict[str, Any]:
        c = _ctx(r, me, friend_of(p)) | first_person
        return c | {"We": "We", "pair": f"{c['q_name']} and I"}

    weather = r.choice(list(WEATHER))
    lines = [f"Dear diary, today was {weather} in {p.home}."]
    lines += _ev_weather(r, ctx() | {"weather": weather})[1:]
    for ev in r.sample([_ev_count, _ev_lost, _ev_gift, _ev_meal], 2):
        lines += ev(r, ctx())
    return "\n".join(lines + [p.name])


def lesson(r: random.Random) -> str:
    teacher = PEOPLE[2]  # Lila, the teacher
    child = r.choice(PEOPLE[3:])
    n = r.randint(1, 15)
    a, b = r.randint(0, 10), r.randint(0, 10)
    return " ".join([
        f"{teacher.name} taught the children to count in the school at {teacher.home}.",
        f"They counted {', '.join(NUMBER_WORDS[1 : r.randint(3, 10)])}.",
        f'"What comes after {NUMBER_WORDS[n]}?" asked {teacher.name}.',
        f'"{NUMBER_WORDS[n + 1].capitalize()} comes after {NUMBER_WORDS[n]}," said {child.name}.',
        f'"And what is {a} plus {b}?" "{a} plus {b} is {a + b}," said {child.name}.',
        r.choice(["Everyone clapped.", f"{teacher.name} was very pleased.", "Then they sang."]),
    ])  # fmt: skip


def generate_pretrain(seed: int = 0, num_docs: int = DEFAULT_NUM_DOCS) -> list[str]:
    """`num_docs` documents: mostly stories, plus descriptions, diaries and counting lessons."""
    r = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        x = r.random()
        if x < 0.62:
            docs.append(story(r))
        elif x < 0.76:
            docs.append(describe_person(r, r.choice(PEOPLE)))
        elif x < 0.84:
            docs.append(describe_place(r, r.choice(PLACES)))
        elif x < 0.93:
            docs.append(diary(r))
        else:
            docs.append(lesson(r))
    return docs


# ---- chat ---------------------------------------------------------------------------------

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly guide to the valley and its towns.",
    "Answer briefly and kindly.",
)
GREETINGS = (
    ("Hello!", "Hello! What would you like to know about the valley?"),
    ("Hi there.", "Hi! How can I help you today?"),
    ("Good morning!", "Good morning! I hope you have a nice day."),
    ("Who are you?", "I am a small assistant. I know the people and towns of the valley."),
    ("What can you do?", "I can tell you about the valley, do simple sums and tell stories."),
)
THING_COLOURS = (
    ("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"),
    ("the sun", "yellow"), ("a ripe plum", "purple"), ("a carrot", "orange"),
    ("a fox", "orange"), ("coal", "black"), ("a storm cloud", "grey"), ("a cherry", "red"),
)  # fmt: skip
ADVICE = {
    "sunny": "Wear a hat and sit in the shade when it is hot.",
    "rainy": "Take an umbrella and wear your boots.",
    "windy": "It is a good day to fly a kite, but hold on to your hat.",
    "snowy": "Wear a warm scarf. You could build a snowman.",
    "foggy": "Walk slowly and carry a lamp so people can see you.",
    "stormy": "Stay inside, close the windows and keep away from tall trees.",
}
UNKNOWN_NAMES = _words("Zorba Quilla Marlo Yelda Brisko Tamsel")


def _person_qa(r: random.Random, p: Person) -> tuple[str, str]:
    n = p.name
    qa = {
        "home": ([f"Where does {n} live?", f"Which town is {n} from?"], f"{n} lives in {p.home}."),
        "colour": (
            [f"What is {n}'s favourite colour?", f"Which colour does {n} like best?"],
            f"{n}'s favourite colour is {p.colour}.",
        ),
        "pet": (
            [f"What pet does {n} have?", f"Does {n} have a pet?"],
            f"{n} has a {p.pet} called {p.pet_name}.",
        ),
        "pet_name": ([f"Who is {p.pet_name}?"], f"{p.pet_name} is {n}'s {p.pet}."),
        "job": ([f"What does {n} do?", f"What is {n}'s job?"], f"{n} is a {p.job}."),
        "food": ([f"What does {n} like to eat?"], f"{n} likes to eat {p.food}."),
        "age": ([f"How old is {n}?"], f"{n} is {p.age} years old."),
        "friend": ([f"Who is {n}'s best friend?"], f"{n}'s best friend is {friend_of(p).name}."),
        "about": ([f"Tell me about {n}.", f"Who is {n}?"], describe_person(r, p)),
    }
    questions, answer = qa[r.choice(list(qa))]
    return r.choice(questions), answer


def _place_qa(r: random.Random, pl: Place) -> tuple[str, str]:
    other = r.choice([x for x in PLACES if x != pl])
    people = residents(pl.name)
    live = "lives" if len(people) == 1 else "live"
    return r.choice([
        (f"Tell me about {pl.name}.", describe_place(r, pl)),
        (f"What is {pl.name} like?", f"{pl.name} is {pl.desc}. There is {pl.feature} there."),
        (f"Who lives in {pl.name}?", f"{and_list(people)} {live} in {pl.name}."),
        (
            f"How far is it from {pl.name} to {other.name}?",
            f"It is {miles(pl.name, other.name)} miles from {pl.name} to {other.name}.",
        ),
    ])  # fmt: skip


def _sum_qa(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 20), r.randint(0, 20)
    op = r.choice(["plus", "plus", "minus", "times", "story"])
    if op == "minus":
        a, b = max(a, b), min(a, b)
    if op == "times":
        a, b = a % 11, b % 11
    if op == "story":
        p, t = r.choice(PEOPLE), r.choice(COUNTABLE)
        q = f"{p.name} has {a} {t} and finds {b} more. How many {t} does {p.name} have now?"
        return q, f"{p.name} has {a + b} {t} now, because {a} plus {b} is {a + b}."
    result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    return f"What is {a} {op} {b}?", f"{a} {op} {b} is {result}."


def _misc_qa(r: random.Random) -> tuple[str, str]:
    x = r.random()
    if x < 0.2:
        a = r.randint(0, 15)
        b = a + r.randint(2, 6)
        return f"Count from {a} to {b}.", ", ".join(str(i) for i in range(a, b + 1)) + "."
    if x < 0.4:
        animal = r.choice(list(SOUNDS))
        return f"What does a {animal} say?", f"A {animal} says {SOUNDS[animal]}."
    if x < 0.6:
        thing, colour = r.choice(THING_COLOURS)
        return f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."
    if x < 0.75:
        w = r.choice(list(ADVICE))
        return f"It is {w} today. What should I do?", ADVICE[w]
    if x < 0.9:
        p = r.choice(PEOPLE)
        return f"Tell me a short story about {p.name}.", story(r, p, events=1).replace("\n", " ")
    name = r.choice(UNKNOWN_NAMES)
    return f"Where does {name} live?", f"I do not know anyone called {name} in the valley."


def _qa(r: random.Random) -> tuple[str, str]:
    x = r.random()
    if x < 0.4:
        return _person_qa(r, r.choice(PEOPLE))
    if x < 0.55:
        return _place_qa(r, r.choice(PLACES))
    if x < 0.75:
        return _sum_qa(r)
    return _misc_qa(r)


def generate_chat(seed: int = 0, num_conversations: int = DEFAULT_NUM_CONVERSATIONS) -> list[dict]:
    """MiniMind SFT records: `{"conversations": [{"role": ..., "content": ...}, ...]}`.

    Roles alternate user/assistant (after an optional system message) and end with assistant.
    """
    r = random.Random(seed)
    records = []
    for _ in range(num_conversations):
        msgs = []
        if r.random() < 0.2:
            msgs.append({"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
        turns = [_qa(r) for _ in range(r.choice([1, 1, 1, 2, 2, 3]))]
        if r.random() < 0.15:
            turns.insert(0, r.choice(GREETINGS))
        if len(turns) > 1 and r.random() < 0.3:
            turns.append(("Thank you!", r.choice(["You are welcome!", "Happy to help."])))
        for q, a in turns:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        records.append({"conversations": msgs})
    return records


# ---- preferences (DPO) -----------------------------------------------------------------------

# Unhelpful replies: the rejected side of some pairs, so preferences cover tone, not only facts.
EVASIONS = (
    "I do not know.",
    "Ask someone else.",
    "That is not a good question.",
    "I would rather not say.",
)
_FACTS = {  # person attribute -> (question templates, answer template)
    "home": (("Where does {n} live?", "Which town is {n} from?"), "{n} lives in {v}."),
    "colour": (("What is {n}'s favourite colour?",), "{n}'s favourite colour is {v}."),
    "pet": (("What pet does {n} have?",), "{n} has a {v}."),
    "job": (("What does {n} do?", "What is {n}'s job?"), "{n} is a {v}."),
    "food": (("What does {n} like to eat?",), "{n} likes to eat {v}."),
    "age": (("How old is {n}?",), "{n} is {v} years old."),
}


def _fact_pair(r: random.Random) -> tuple[str, str, str]:
    """(question, true answer, false answer) about a person of the valley."""
    p = r.choice(PEOPLE)
    field = r.choice(list(_FACTS))
    questions, answer = _FACTS[field]
    right = getattr(p, field)
    wrong = r.choice(sorted({getattr(q, field) for q in PEOPLE} - {right}))
    q = r.choice(questions).format(n=p.name)
    return q, answer.format(n=p.name, v=right), answer.format(n=p.name, v=wrong)


def _sum_pair(r: random.Random) -> tuple[str, str, str]:
    a, b = r.randint(0, 20), r.randint(0, 20)
    wrong = a + b + r.choice([-3, -2, -1, 1, 2, 3])
    if wrong < 0:
        wrong = a + b + 1
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."


def generate_dpo(seed: int = 0, num_pairs: int = DEFAULT_NUM_PAIRS) -> list[dict]:
    """MiniMind DPO records: `{"chosen": [messages], "rejected": [messages]}`.

    Both sides share the prompt (an optional system message and a user question) and differ in
    the assistant's last reply: true against false facts and sums, helpful against evasive.
    """
    r = random.Random(seed)
    records = []
    for _ in range(num_pairs):
        prompt = []
        if r.random() < 0.2:
            prompt.append({"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
        x = r.random()
        if x < 0.6:
            question, good, bad = _fact_pair(r)
        elif x < 0.8:
            question, good, bad = _sum_pair(r)
        else:
            question, good = _qa(r)
            bad = r.choice(EVASIONS)
        prompt.append({"role": "user", "content": question})
        records.append(
            {
                "chosen": [*prompt, {"role": "assistant", "content": good}],
                "rejected": [*prompt, {"role": "assistant", "content": bad}],
            }
        )
    return records


def to_jsonl(records: list[dict]) -> str:
    """One JSON object per line, newline-terminated, non-ASCII kept as is."""
    return "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)


def write_assets(directory: Path | None = None) -> None:
    """Write `pretrain.jsonl`, `chat.jsonl` and `dpo.jsonl` (default: the package's assets)."""
    directory = Path(directory) if directory is not None else ASSETS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    pretrain = to_jsonl([{"text": t} for t in generate_pretrain()])
    (directory / PRETRAIN_PATH.name).write_text(pretrain, encoding="utf-8", newline="\n")
    (directory / CHAT_PATH.name).write_text(
        to_jsonl(generate_chat()), encoding="utf-8", newline="\n"
    )
    (directory / DPO_PATH.name).write_text(to_jsonl(generate_dpo()), encoding="utf-8", newline="\n")


if __name__ == "__main__":
    write_assets()
