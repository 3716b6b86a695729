"""Templated + combinatorial NPC-dialogue text generator: player questions, persona answers, expected facts, DPO rejects."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

from npc_server.controls import EMOTIONS
from npc_server.training.corpus.world import (
    ACCENT_VOICES,
    CHARACTERS,
    ITEMS,
    LANGUAGE_NAMES,
    LANGUAGE_VOICES,
    PERSONAS,
    PLACES,
    Item,
    Persona,
    Place,
    character_of,
    gold,
    items_sold_by,
    number_en,
)

CATEGORIES = (
    "greeting", "price", "directions", "quest", "smalltalk", "time", "farewell",
    "arithmetic", "reasoning", "facts", "multiturn", "control", "language",
)
# Relative frequency of each category in the corpus.
CATEGORY_WEIGHTS = {
    "greeting": 5, "price": 12, "directions": 9, "quest": 6, "smalltalk": 8, "time": 6, "farewell": 4,
    "arithmetic": 10, "reasoning": 9, "facts": 10, "multiturn": 11, "control": 10, "language": 8,
}
PERSONA_WEIGHTS = {"innkeeper": 1.2, "guard": 1.0, "merchant": 1.3, "blacksmith": 1.0, "quest_giver": 1.0,
                   "companion": 1.0, "tea_seller": 0.7}
# The tea seller speaks Japanese only: these are the categories she has lines for.
TEA_SELLER_CATEGORIES = ("greeting", "price", "farewell", "smalltalk")

SPLIT_FRACTIONS = {"train": 0.88, "valid": 0.04, "heldout": 0.08}


@dataclass
class Dialogue:
    """One NPC answer turn (see the corpus contract in the README / docs)."""

    id: str
    split: str
    category: str
    persona: str
    npc_voice: str
    language: str  # language of the answer
    accent: str
    controls: dict
    history: list[dict]
    question_text: str
    question_language: str
    answer_text: str
    expected: list[str]
    rejected_text: str
    question_audio_id: str = ""
    answer_audio_id: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "id": self.id, "split": self.split, "category": self.category, "persona": self.persona,
            "npc_voice": self.npc_voice, "language": self.language, "accent": self.accent,
            "controls": dict(self.controls), "history": [dict(h) for h in self.history],
            "question_text": self.question_text, "question_audio_id": self.question_audio_id,
            "answer_text": self.answer_text, "answer_audio_id": self.answer_audio_id,
            "expected": list(self.expected), "rejected_text": self.rejected_text,
        }


class NoLine(Exception):
    """This persona has no line for the drawn category; draw again."""


# ---------------------------------------------------------------------------------------------- helpers


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def normalize_question(text: str) -> str:
    """Lower-case, punctuation-free form used to keep held-out question texts out of training."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def split_of(question_text: str) -> str:
    """Split by a stable hash of the question text (independent of the seed, so held-out stays held-out)."""
    h = int(hashlib.sha1(("npc-split:" + normalize_question(question_text)).encode()).hexdigest()[:8], 16) % 1000
    if h < SPLIT_FRACTIONS["heldout"] * 1000:
        return "heldout"
    if h < (SPLIT_FRACTIONS["heldout"] + SPLIT_FRACTIONS["valid"]) * 1000:
        return "valid"
    return "train"


def obj(pronoun: str) -> str:
    return {"he": "him", "she": "her"}[pronoun]


def place_phrase(place: Place) -> str:
    return place.name


def self_place(persona: Persona) -> Place:
    return PLACES[persona.workplace]


# Names of the English personas in the other languages (for "answer in Japanese" etc.).
NAME_TRANSLATIONS = {
    "Greta": {"ja": "グレタ", "yue": "格蕾塔", "cmn": "ge2 lei2 ta3"},
    "Sergeant Angus": {"ja": "アンガス", "yue": "安格斯", "cmn": "an1 ge2 si1"},
    "Tomas": {"ja": "トマス", "yue": "湯馬士", "cmn": "tang1 ma3 shi4"},
    "Bram": {"ja": "ブラム", "yue": "布蘭", "cmn": "bu4 lan2"},
    "Elder Maren": {"ja": "マレン", "yue": "瑪倫", "cmn": "ma3 lun2"},
    "Finn": {"ja": "フィン", "yue": "芬恩", "cmn": "fen1 en1"},
    "Aiko": {"ja": "アイコ", "yue": "愛子", "cmn": "ai4 zi3"},
}

# Lines in the other languages: (question templates, answer templates) per intent; {item}, {price}, {name}.
FOREIGN = {
    "ja": {
        "greeting": (("こんにちわ！", "こんばんわ。", "おはよう ございます！"),
                     ("いらっしゃいませ！ オークベールえ ようこそ。", "こんにちわ！ ようこそ。")),
        "price": (("{item}わ いくらですか？", "{item}を ください。 いくらですか？"),
                  ("{item}わ {price}です。", "{item}です か？ {price}です。")),
        "farewell": (("さようなら！", "じゃあ、 また ね。"), ("さようなら。 きを つけて。", "また きてね！")),
        "how_are_you": (("おげんきですか？",), ("げんきです。 ありがとう。",)),
        "name": (("おなまえわ なんですか？",), ("わたしわ {name}です。",)),
    },
    "yue": {
        "greeting": (("你好！", "早晨！"), ("歡迎光臨橡樹谷！", "你好！歡迎你嚟。")),
        "price": (("{item}幾多錢？", "我想買{item}，幾多錢呀？"), ("{item}要{price}。", "{item}呀？{price}。")),
        "farewell": (("再見！", "拜拜！"), ("再見，一路順風！", "拜拜，下次再嚟！")),
        "how_are_you": (("你好嗎？",), ("我好好，多謝。",)),
        "name": (("你叫咩名呀？",), ("我叫{name}。",)),
    },
    "cmn": {
        "greeting": (("ni3 hao3!", "zao3 shang4 hao3!"), ("huan1 ying2 guang1 lin2 xiang4 shu4 gu3!", "ni3 hao3! huan1 ying2 ni3.")),
        "price": (("{item} duo1 shao3 qian2?", "wo3 xiang3 mai3 {item}, duo1 shao3 qian2?"),
                  ("{item} yao4 {price}.", "{item} ma5? {price}.")),
        "farewell": (("zai4 jian4!", "wo3 zou3 le5, zai4 jian4!"), ("zai4 jian4, yi2 lu4 shun4 feng1!", "zai4 jian4, huan1 ying2 zai4 lai2!")),
        "how_are_you": (("ni3 hao3 ma5?",), ("wo3 hen3 hao3, xie4 xie5.",)),
        "name": (("ni3 jiao4 shen2 me5 ming2 zi5?",), ("wo3 jiao4 {name}.",)),
    },
}
FOREIGN_EN_QUESTIONS = {
    "greeting": ("Hello!", "Good day!"),
    "price": ("How much is the {item}?", "What does {a_item} cost?"),
    "farewell": ("Goodbye!", "I have to go now. Bye!"),
    "how_are_you": ("How are you?", "How are you doing today?"),
    "name": ("What's your name?", "Who are you?"),
}
LANGUAGE_REQUESTS = (
    "{q} Answer in {lang}, please.", "{q} Please reply in {lang}.", "Can you answer in {lang}? {q}",
    "{q} Say it in {lang}.", "In {lang}, please: {q_lower}",
)

GENERIC_DEFLECTIONS = (
    "Sorry, I didn't catch that.", "I'm busy right now. Ask someone else.", "What? I don't know anything about that.",
    "Hmm, I can't help you with that.",
)


# ---------------------------------------------------------------------------------------------- categories


def _item_for(rng: random.Random, persona: Persona, own_bias: float = 0.7) -> Item:
    own = items_sold_by(persona.role)
    if own and rng.random() < own_bias:
        return rng.choice(own)
    return rng.choice(list(ITEMS.values()))


def price_answer(rng: random.Random, persona: Persona, item: Item, price: int | None = None) -> str:
    price = item.price if price is None else price
    g = gold(price)
    if item.seller == persona.role:
        return rng.choice((f"The {item.name} costs {g}.", f"{cap(article(item.name))} is {g}.",
                           f"That's {g} for the {item.name}.", f"For you, {g}. A fair price for a fine {item.name}."))
    seller = PERSONAS[item.seller]
    where = place_phrase(PLACES[seller.workplace])
    return rng.choice((f"I don't sell that, but {seller.name} at {where} does. {cap(article(item.name))} costs {g} there.",
                       f"You want {seller.name} for that, at {where}. The {item.name} costs {g}."))


def gen_greeting(rng, persona):
    q = rng.choice(("Hello!", "Hi there!", "Good morning!", "Good evening!", f"Hello, {persona.name}!", "Greetings!",
                    "Hey, is anybody here?", "Good day to you.", f"Hi {persona.name}, how are things?"))
    a = rng.choice(persona.greetings)
    if q.startswith("Good morning"):
        a = "Good morning! " + a
    elif q.startswith("Good evening"):
        a = "Good evening! " + a
    return q, a, [], rng.choice(persona.farewells)


def gen_farewell(rng, persona):
    q = rng.choice(("Goodbye!", "Bye!", "See you later.", "I have to go now.", f"Farewell, {persona.name}.",
                    "Thanks, goodbye!", "I'll be on my way.", "Good night!"))
    a = rng.choice(persona.farewells)
    return q, a, [], rng.choice(persona.greetings)


def gen_price(rng, persona):
    if rng.random() < 0.12 and items_sold_by(persona.role):
        q = rng.choice(("What do you sell?", "What do you have for sale?", "What can I buy here?"))
        names = [i.plural for i in items_sold_by(persona.role)]
        listing = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        a = f"I sell {listing}."
        return q, a, [names[0]], rng.choice(GENERIC_DEFLECTIONS)
    item = _item_for(rng, persona)
    q = rng.choice((f"How much is the {item.name}?", f"How much does {article(item.name)} cost?",
                    f"What's the price of {article(item.name)}?", f"I'd like to buy {article(item.name)}. How much?",
                    f"How much for {article(item.name)}?"))
    wrong = rng.choice([p for p in range(1, 30) if p != item.price])
    return q, price_answer(rng, persona, item), [gold(item.price)], price_answer(rng, persona, item, wrong)


def gen_directions(rng, persona):
    place = rng.choice(list(PLACES.values()))
    if rng.random() < 0.2 and place.minutes > 0:
        q = rng.choice((f"How far is {place.name}?", f"How long does it take to walk to {place.name}?"))
        m = place.minutes
        a = f"{cap(place.name)} is about {number_en(m)} minute{'s' if m != 1 else ''} on foot from the market square."
        wrong = rng.choice([x for x in range(1, 20) if x != m])
        rej = f"{cap(place.name)} is about {number_en(wrong)} minutes on foot from the market square."
        return q, a, [number_en(m)], rej
    q = rng.choice((f"Where is {place.name}?", f"How do I get to {place.name}?", f"Which way to {place.name}?",
                    f"Can you tell me the way to {place.name}?", f"Where can I find {place.name}?"))
    if place.id == persona.workplace and place.id not in ("market", "well"):
        a = f"You're already here! This is {place.name}."
        expected = ["here"]
    else:
        a = place.directions
        expected = [place.keyword]
    other = rng.choice([p for p in PLACES.values() if p.id != place.id and place.keyword not in p.directions])
    return q, a, expected, other.directions


def gen_quest(rng, persona):
    if persona.role == "quest_giver":
        options = [
            (("Do you have any work for me?", "Is there a quest for me?", "Can I help you with anything?", "I'm looking for work."),
             "Yes, child. I lost my silver ring in the old mill. Find it and I will give you fifty gold.", ["ring"]),
            (("What is the reward?", "What do I get if I find the ring?", "How much will you pay me?"),
             "Fifty gold, and my blessing.", ["fifty"]),
            (("Where did you lose the ring?", "Where is your ring?"),
             "In the old mill, across the stone bridge and west along the river.", ["mill"]),
            (("What does the ring look like?", "How will I know it's your ring?"),
             "It is a small silver ring with a blue stone.", ["silver"]),
            (("I found your ring!", "Here is your silver ring."),
             "My ring! Thank you, child. Here are your fifty gold coins.", ["thank"]),
        ]
    elif persona.role == "companion":
        options = [
            (("What should we do next?", "Where should we go now?", "Any ideas for an adventure?"),
             "Let's help Elder Maren find her silver ring in the old mill! She pays fifty gold.", ["ring"]),
            (("Are you afraid of the old mill?", "Do you think the mill is haunted?"),
             "A little. Old Hugo says it's haunted. But I'm with you, so let's go!", ["haunted"]),
        ]
    else:
        options = [
            (("Is there any work around here?", "Have you heard of any quests?", "Does anyone need help in town?"),
             "Elder Maren at the chapel needs help. She lost a silver ring in the old mill.", ["silver ring"]),
            (("Do you know anything about the old mill?", "What happened at the old mill?"),
             "Nobody goes there anymore. Old Hugo says it's haunted, and Elder Maren lost her ring there.", ["haunted"]),
        ]
    qs, a, expected = rng.choice(options)
    rej = rng.choice(("There's no work here. Go away.", "I don't know anything about a quest.",
                      "Elder Maren lost her golden crown in the chapel."))
    return rng.choice(qs), a, expected, rej


def gen_smalltalk(rng, persona):
    topic = rng.choice(("how_are_you", "name", "job", "news", "weather", "age", "likes"))
    me = character_of(persona.role)
    qs = {
        "how_are_you": ("How are you?", "How are you doing today?", "How's business?", "How have you been?"),
        "name": ("What's your name?", "Who are you?", "And you are?"),
        "job": ("What do you do here?", "What is your job?", "What do you do all day?"),
        "news": ("Any news?", "Heard any rumours lately?", "What's new in town?", "Tell me some gossip."),
        "weather": ("Nice weather today, isn't it?", "Will it rain today?", "How's the weather?"),
        "age": ("How old are you?", "May I ask your age?"),
        "likes": ("What do you like to do?", "What's your favourite thing?", "What do you enjoy?"),
    }[topic]
    if topic == "age":
        a, expected = f"I am {number_en(me.age)} years old.", [number_en(me.age)]
    elif topic == "likes":
        a, expected = f"I like {me.likes}.", [me.likes]
    else:
        a = rng.choice(persona.smalltalk[topic])
        expected = [me.name.split()[-1]] if topic == "name" else []
    other = rng.choice([t for t in persona.smalltalk if t != topic])
    return rng.choice(qs), a, expected, rng.choice(persona.smalltalk[other])


def _time_answer(place: Place, what: str, me: bool) -> str:
    subject = "I" if me else cap(place.name)
    if place.opens is None:
        return ("I never close. Come any time!" if me else f"{subject} is always open, day and night.")
    verb = {"open": "open" if me else "opens", "close": "close" if me else "closes"}[what]
    return f"{subject} {verb} at {place.opens if what == 'open' else place.closes}."


def gen_time(rng, persona):
    place = rng.choice([p for p in PLACES.values() if p.id not in ("bridge", "well", "tower")])
    what = rng.choice(("open", "close"))
    me = place.id == persona.workplace and persona.role not in ("companion",) and rng.random() < 0.6
    if me:
        q = rng.choice((f"When do you {what}?", f"What time do you {what}?"))
    else:
        q = rng.choice((f"When does {place.name} {what}?", f"What time does {place.name} {what}?",
                        f"Is {place.name} open at night?" if what == "close" else f"How early does {place.name} open?"))
    if q.endswith("open at night?"):
        if place.opens is None:
            a = f"Yes, {place.name} is always open."
            expected = ["yes"]
        else:
            a = f"No, {place.name} closes at {place.closes}."
            expected = [place.closes.split()[0]]
    else:
        a = _time_answer(place, what, me)
        expected = ["always" if place.opens is None and not me else
                    "never" if place.opens is None else (place.opens if what == "open" else place.closes).split()[0]]
    other = rng.choice([p for p in PLACES.values() if p.opens and p.opens != place.opens])
    rej = f"{cap(place.name)} {'opens' if what == 'open' else 'closes'} at {other.opens if what == 'open' else other.closes}."
    return q, a, expected, rej


COUNTABLE = ("apple", "torch", "horseshoe", "bread", "lantern", "rope", "dagger", "blanket")


def gen_arithmetic(rng, persona):
    kind = rng.choice(("buy_more", "spend", "plus", "minus", "times", "cost_n", "total", "split"))
    if kind == "buy_more":
        item = ITEMS[rng.choice(COUNTABLE)]
        a_, b_ = rng.randint(1, 12), rng.randint(1, 9)
        q = rng.choice((f"I have {number_en(a_)} {item.plural if a_ > 1 else item.name} and buy {number_en(b_)} more. How many do I have now?",
                        f"If I have {number_en(a_)} {item.plural if a_ > 1 else item.name} and get {number_en(b_)} more, how many is that?"))
        r = a_ + b_
        return q, f"Then you have {number_en(r)} {item.plural}.", [number_en(r)], f"Then you have {number_en(r + rng.choice((-1, 1, 2)))} {item.plural}."
    if kind == "spend":
        a_ = rng.randint(5, 60)
        b_ = rng.randint(1, a_ - 1)
        q = rng.choice((f"I had {number_en(a_)} gold and spent {number_en(b_)}. How much is left?",
                        f"If I have {number_en(a_)} gold and pay {number_en(b_)}, how much do I keep?"))
        r = a_ - b_
        return q, f"You have {gold(r)} left.", [number_en(r)], f"You have {gold(a_ + b_)} left."
    if kind in ("plus", "minus", "times"):
        if kind == "times":
            a_, b_ = rng.randint(2, 12), rng.randint(2, 10)
            r, word = a_ * b_, "times"
        elif kind == "plus":
            a_, b_ = rng.randint(1, 50), rng.randint(1, 50)
            r, word = a_ + b_, "plus"
        else:
            a_ = rng.randint(2, 60)
            b_ = rng.randint(1, a_ - 1)
            r, word = a_ - b_, "minus"
        q = rng.choice((f"What is {number_en(a_)} {word} {number_en(b_)}?", f"Quick, what's {number_en(a_)} {word} {number_en(b_)}?",
                        f"Can you tell me what {number_en(a_)} {word} {number_en(b_)} is?"))
        a = rng.choice((f"{cap(number_en(a_))} {word} {number_en(b_)} is {number_en(r)}.", f"That's {number_en(r)}."))
        return q, a, [number_en(r)], f"That's {number_en(r + rng.choice((-2, -1, 1, 10)))}."
    if kind == "cost_n":
        item = _item_for(rng, persona, 0.6)
        n = rng.randint(2, 6)
        q = rng.choice((f"How much do {number_en(n)} {item.plural} cost?", f"What would {number_en(n)} {item.plural} cost me?"))
        r = n * item.price
        return (q, f"{cap(number_en(n))} {item.plural} cost {gold(r)}.", [gold(r)],
                f"{cap(number_en(n))} {item.plural} cost {gold(r + item.price)}.")
    if kind == "total":
        i1, i2 = rng.sample(list(ITEMS.values()), 2)
        n = rng.randint(1, 4)
        q = f"I want {number_en(n)} {i1.plural if n > 1 else i1.name} and {article(i2.name)}. What is the total?"
        r = n * i1.price + i2.price
        return q, f"That is {gold(r)} in all.", [number_en(r)], f"That is {gold(i1.price + i2.price + (n > 1))} in all."
    k = rng.randint(2, 5)
    each = rng.randint(2, 12)
    q = rng.choice((f"Can you split {number_en(k * each)} gold between {number_en(k)} of us?",
                    f"We are {number_en(k)} friends with {number_en(k * each)} gold. How much does each get?"))
    return q, f"That is {gold(each)} each.", [number_en(each)], f"That is {gold(each + 1)} each."


def gen_reasoning(rng, persona):
    kind = rng.choice(("cheaper", "dearer", "afford", "closer", "older", "bigger"))
    if kind in ("cheaper", "dearer"):
        a_, b_ = rng.sample([i for i in ITEMS.values()], 2)
        while a_.price == b_.price:
            a_, b_ = rng.sample([i for i in ITEMS.values()], 2)
        lo, hi = (a_, b_) if a_.price < b_.price else (b_, a_)
        if kind == "cheaper":
            q = rng.choice((f"Which is cheaper, the {a_.name} or the {b_.name}?", f"What costs less, the {a_.name} or the {b_.name}?"))
            ans = f"The {lo.name} is cheaper. It costs {gold(lo.price)}, and the {hi.name} costs {gold(hi.price)}."
            rej = f"The {hi.name} is cheaper. It costs {gold(lo.price)}."
            return q, ans, [lo.name], rej
        q = f"Is the {a_.name} more expensive than the {b_.name}?"
        if a_.price > b_.price:
            ans = f"Yes. The {a_.name} costs {gold(a_.price)}, and the {b_.name} only {gold(b_.price)}."
            return q, ans, ["yes"], f"No, the {a_.name} is cheaper."
        ans = f"No. The {a_.name} costs {gold(a_.price)}, but the {b_.name} costs {gold(b_.price)}."
        return q, ans, ["no"], f"Yes, the {a_.name} is more expensive."
    if kind == "afford":
        item = _item_for(rng, persona, 0.5)
        g = max(1, item.price + rng.choice((-5, -3, -2, -1, 0, 1, 2, 4, 8)))
        q = rng.choice((f"I have {gold(g)}. Can I buy the {item.name}?", f"Is {gold(g)} enough for {article(item.name)}?"))
        if g >= item.price:
            ans = f"Yes. The {item.name} costs {gold(item.price)}, so you will have {gold(g - item.price)} left."
            return q, ans, ["yes"], f"No, you need more gold for the {item.name}."
        ans = f"No. The {item.name} costs {gold(item.price)}. You need {gold(item.price - g)} more."
        return q, ans, ["no"], f"Yes, {gold(g)} is enough for the {item.name}."
    if kind == "closer":
        a_, b_ = rng.sample([p for p in PLACES.values() if p.minutes > 0], 2)
        while a_.minutes == b_.minutes:
            a_, b_ = rng.sample([p for p in PLACES.values() if p.minutes > 0], 2)
        near, far = (a_, b_) if a_.minutes < b_.minutes else (b_, a_)
        q = f"Which is closer to the market square, {a_.name} or {b_.name}?"
        ans = f"{cap(near.name)} is closer, about {number_en(near.minutes)} minute{'s' if near.minutes > 1 else ''} away."
        return q, ans, [near.name.split()[-1]], f"{cap(far.name)} is closer."
    if kind == "older":
        a_, b_ = rng.sample(list(CHARACTERS.values()), 2)
        old, young = (a_, b_) if a_.age > b_.age else (b_, a_)
        q = rng.choice((f"Who is older, {a_.name} or {b_.name}?", f"Is {a_.name} older than {b_.name}?"))
        if q.startswith("Is "):
            yes = a_.age > b_.age
            ans = (f"{'Yes' if yes else 'No'}. {a_.name} is {number_en(a_.age)} and {b_.name} is {number_en(b_.age)}.")
            return q, ans, ["yes" if yes else "no"], f"{'No' if yes else 'Yes'}, {young.name} is older."
        ans = f"{old.name} is older. {cap(old.pronoun)} is {number_en(old.age)}."
        return q, ans, [old.name.split()[-1]], f"{young.name} is older."
    a_, b_ = rng.sample(range(1, 100), 2)
    q = rng.choice((f"Which is bigger, {number_en(a_)} or {number_en(b_)}?", f"Which number is larger, {number_en(a_)} or {number_en(b_)}?"))
    hi, lo = max(a_, b_), min(a_, b_)
    return q, f"{cap(number_en(hi))} is bigger than {number_en(lo)}.", [number_en(hi)], f"{cap(number_en(lo))} is bigger."


RUNNERS = {"inn": "greta", "bakery": "lily", "smithy": "bram", "chapel": "maren", "tower": "rowan", "gate": "angus", "market": "tomas"}


def gen_facts(rng, persona):
    me = character_of(persona.role)
    others = [c for c in CHARACTERS.values() if c.id != me.id]
    kind = rng.choice(("who_runs", "where", "age", "likes", "about", "who_sells", "inn_name"))
    if kind == "who_runs":
        pid = rng.choice([p for p in RUNNERS if RUNNERS[p] != me.id])
        c = CHARACTERS[RUNNERS[pid]]
        q = rng.choice((f"Who runs {PLACES[pid].name}?", f"Who works at {PLACES[pid].name}?"))
        wrong = rng.choice([x for x in others if x.id != c.id])
        return q, f"{c.name} {c.job}.", [c.name.split()[-1]], f"{wrong.name} {c.job}."
    c = rng.choice(others)
    if kind == "where":
        q = rng.choice((f"Where can I find {c.name}?", f"Where is {c.name}?", f"Where does {c.name} work?"))
        where = "with you, of course" if c.id == "finn" else f"at {PLACES[c.place].name}"
        wrong = rng.choice([p for p in PLACES.values() if p.id != c.place])
        return q, f"You can find {c.name} {where}.", ["with you"] if c.id == "finn" else [PLACES[c.place].name.split()[-1]], f"You can find {c.name} at {wrong.name}."
    if kind == "age":
        q = f"How old is {c.name}?"
        return q, f"{c.name} is {number_en(c.age)} years old.", [number_en(c.age)], f"{c.name} is {number_en(c.age + rng.choice((-7, 5, 11)))} years old."
    if kind == "likes":
        q = rng.choice((f"What does {c.name} like?", f"What does {c.name} enjoy?"))
        wrong = rng.choice([x for x in others if x.likes != c.likes])
        return q, f"{c.name} likes {c.likes}.", [c.likes], f"{c.name} likes {wrong.likes}."
    if kind == "about":
        q = rng.choice((f"Tell me about {c.name}.", f"Who is {c.name}?"))
        wrong = rng.choice([x for x in others if x.id != c.id])
        return q, f"{c.name} {c.job}. {c.fact}", [c.job.split()[-1]], f"{c.name} {wrong.job}."
    if kind == "who_sells":
        item = rng.choice([i for i in ITEMS.values() if i.seller != persona.role])
        seller = PERSONAS[item.seller]
        q = rng.choice((f"Who sells {item.plural}?", f"Where can I buy {article(item.name)}?"))
        wrong = rng.choice([p for p in PERSONAS.values() if p.role != item.seller])
        return (q, f"{seller.name} sells them at {PLACES[seller.workplace].name}.", [seller.name.split()[-1]],
                f"{wrong.name} sells them at {PLACES[wrong.workplace].name}.")
    q = rng.choice(("What is the name of the inn?", "What's the inn called?"))
    return q, "The inn is called The Sleepy Otter.", ["Otter"], "The inn is called The Golden Goose."


def gen_multiturn(rng, persona):
    kind = rng.choice(("item_price", "item_price", "place_time", "place_far", "char_where", "char_age", "qty", "change", "count"))
    if kind in ("item_price", "qty", "change"):
        item = _item_for(rng, persona, 0.75)
        q0 = rng.choice((f"Do you sell {item.plural}?", f"Do you have {article(item.name)}?", f"I'm looking for {article(item.name)}."))
        if item.seller == persona.role:
            a0 = rng.choice((f"Yes, I have a fine {item.name} right here.", f"I do. Best {item.name} in Oakvale."))
        else:
            s = PERSONAS[item.seller]
            a0 = f"Not me, but {s.name} at {PLACES[s.workplace].name} does."
        history = [{"question": q0, "answer": a0}]
        q1 = rng.choice(("How much is it?", "What does it cost?", "And the price?", "How much does it cost?", "What's the price?"))
        a1 = price_answer(rng, persona, item)
        if kind == "item_price":
            return history, q1, a1, [gold(item.price)], rng.choice(("How much is what?", "Which one do you mean?"))
        history.append({"question": q1, "answer": a1})
        if kind == "qty":
            n = rng.randint(2, 5)
            q2 = rng.choice((f"And how much for {number_en(n)}?", f"What if I buy {number_en(n)}?", f"And {number_en(n)} of them?"))
            r = n * item.price
            return history, q2, f"{cap(number_en(n))} {item.plural} cost {gold(r)}.", [number_en(r)], f"That is {gold(item.price)}."
        g = item.price + rng.randint(0, 15)
        q2 = rng.choice((f"I'll take it. Here is {gold(g)}. What's my change?", f"I'll take it. I have {gold(g)}. How much will I have left?"))
        r = g - item.price
        a2 = f"Your change is {gold(r)}." if "change" in q2 else f"You will have {gold(r)} left."
        return history, q2, a2, [number_en(r)], f"You will have {gold(g)} left."
    if kind in ("place_time", "place_far"):
        place = rng.choice([p for p in PLACES.values() if p.id not in ("market",)])
        q0 = rng.choice((f"Where is {place.name}?", f"How do I get to {place.name}?"))
        history = [{"question": q0, "answer": place.directions}]
        if kind == "place_time":
            what = rng.choice(("open", "close"))
            q1 = rng.choice((f"When does it {what}?", f"And what time does it {what}?", f"Is it {what} late?" if what == "open" else f"When does it {what}?"))
            if q1.startswith("Is it"):
                q1 = f"When does it {what}?"
            a1 = _time_answer(place, what, False).replace(cap(place.name), "It", 1)
            expected = ["always"] if place.opens is None else [(place.opens if what == "open" else place.closes).split()[0]]
            return history, q1, a1, expected, "When does what open?"
        q1 = rng.choice(("How far is it?", "How long is the walk?", "Is it far from here?"))
        m = max(place.minutes, 1)
        return (history, q1, f"It is about {number_en(m)} minute{'s' if m > 1 else ''} on foot from the market square.",
                [number_en(m)], "Far from where?")
    if kind in ("char_where", "char_age"):
        c = rng.choice([x for x in CHARACTERS.values() if x.persona != persona.role and x.id != "finn"])
        q0 = rng.choice((f"Who is {c.name}?", f"Do you know {c.name}?"))
        history = [{"question": q0, "answer": f"{c.name} {c.job}."}]
        if kind == "char_where":
            q1 = rng.choice((f"Where can I find {obj(c.pronoun)}?", f"Where does {c.pronoun} live?", f"Where is {c.pronoun} now?"))
            return history, q1, f"You can find {obj(c.pronoun)} at {PLACES[c.place].name}.", [PLACES[c.place].name.split()[-1]], "Who do you mean?"
        q1 = rng.choice((f"How old is {c.pronoun}?", f"And how old is {c.pronoun}?"))
        return history, q1, f"{cap(c.pronoun)} is {number_en(c.age)} years old.", [number_en(c.age)], "Who do you mean?"
    item = ITEMS[rng.choice(COUNTABLE)]
    a_ = rng.randint(3, 12)
    b_ = rng.randint(1, a_ - 1)
    history = [{"question": f"I have {number_en(a_)} {item.plural}.", "answer": f"{cap(number_en(a_))} {item.plural}, very good."}]
    q1 = rng.choice((f"I give {number_en(b_)} to Finn. How many are left?", f"Now I lose {number_en(b_)}. How many do I have?"))
    return history, q1, f"You have {number_en(a_ - b_)} {item.plural if a_ - b_ != 1 else item.name} left.", [number_en(a_ - b_)], f"You have {number_en(a_)} {item.plural}."


# Instructions embedded in the request: phrase -> control changes.
CONTROL_REQUESTS = (
    ("Say it slowly.", {"speed": 0.7}), ("Please speak slowly.", {"speed": 0.7}), ("Say it very slowly.", {"speed": 0.55}),
    ("Say it quickly.", {"speed": 1.4}), ("Speak fast, I'm in a hurry.", {"speed": 1.5}), ("A bit faster, please.", {"speed": 1.25}),
    ("Say it cheerfully.", {"emotion": "happy"}), ("Sound happy!", {"emotion": "happy"}), ("Say it sadly.", {"emotion": "sad"}),
    ("Tell me angrily.", {"emotion": "angry"}), ("Say it with excitement!", {"emotion": "excited"}),
    ("Sound scared.", {"emotion": "fearful"}), ("Say it calmly.", {"emotion": "calm"}),
    ("Whisper it.", {"emotion": "calm", "speed": 0.85, "whisper": True}),
    ("Say it in a higher voice.", {"pitch_st": 4.0}), ("Use a deeper voice.", {"pitch_st": -4.0}),
    ("Say it in a very high voice.", {"pitch_st": 7.0}), ("Use a much deeper voice.", {"pitch_st": -7.0}),
    ("Say it with a Scottish accent.", {"accent": "scotland"}), ("Say it with a British accent.", {"accent": "gb"}),
    ("Say it with an American accent.", {"accent": "us"}),
)


def default_controls(rng: random.Random, persona: Persona) -> dict:
    """Persona defaults most of the time; otherwise random per-request overrides (the prompt carries them)."""
    if rng.random() < 0.55:
        return {"emotion": persona.default_emotion, "speed": 1.0, "pitch_st": 0.0}
    return {"emotion": rng.choice(sorted(EMOTIONS)), "speed": round(rng.uniform(0.75, 1.35), 2),
            "pitch_st": float(rng.randint(-4, 4))}


BASE_GENERATORS = {
    "greeting": gen_greeting, "price": gen_price, "directions": gen_directions, "quest": gen_quest,
    "smalltalk": gen_smalltalk, "time": gen_time, "farewell": gen_farewell, "arithmetic": gen_arithmetic,
    "reasoning": gen_reasoning, "facts": gen_facts,
}


def _tea_seller(rng: random.Random, category: str):
    """Aiko answers in Japanese; the player asks in Japanese or English."""
    intent = {"greeting": "greeting", "price": "price", "farewell": "farewell",
              "smalltalk": rng.choice(("how_are_you", "name", "job"))}[category]
    persona = PERSONAS["tea_seller"]
    item = rng.choice(items_sold_by("tea_seller"))
    ask_ja = rng.random() < 0.7
    if intent in ("greeting", "price", "farewell", "how_are_you", "name"):
        qs, answers = FOREIGN["ja"][intent]
        fill = {"item": item.translations["ja"], "price": gold(item.price, "ja"), "name": "アイコ"}
        q = rng.choice(qs).format(**fill) if ask_ja else rng.choice(FOREIGN_EN_QUESTIONS[intent]).format(item=item.name, a_item=article(item.name))
        a = rng.choice(answers).format(**fill)
        if intent == "greeting":
            a = rng.choice(persona.greetings)
        elif intent == "farewell":
            a = rng.choice(persona.farewells)
        expected = {"price": [gold(item.price, "ja")], "name": ["アイコ"]}.get(intent, [])
    else:  # job
        q = rng.choice(("おしごとわ なんですか？", "どこから きましたか？")) if ask_ja else rng.choice(("What do you do here?", "Where are you from?"))
        a = persona.smalltalk["job"][0]
        expected = ["おちゃ"]
    rej = rng.choice(("すみません、 わかりません。", "I'm sorry, I don't understand."))
    return q, "ja" if ask_ja else "en", a, expected, rej


def _language(rng: random.Random, persona: Persona):
    """The player asks for (or speaks) Japanese / Cantonese / Mandarin; the NPC answers in it."""
    lang = rng.choice(sorted(LANGUAGE_VOICES))
    intent = rng.choice(("greeting", "price", "price", "farewell", "how_are_you", "name"))
    item = _item_for(rng, persona, 0.8)
    qs, answers = FOREIGN[lang][intent]
    name_t = NAME_TRANSLATIONS[persona.name][lang]
    fill = {"item": item.translations[lang], "price": gold(item.price, lang), "name": name_t}
    a = rng.choice(answers).format(**fill)
    expected = {"price": [gold(item.price, lang)], "name": [name_t]}.get(intent, [])
    # The English answer the NPC would give when it ignores the language request.
    en_answer = {"greeting": persona.greetings[0], "farewell": persona.farewells[0],
                 "price": price_answer(random.Random(0), persona, item), "how_are_you": persona.smalltalk["how_are_you"][0],
                 "name": persona.smalltalk["name"][0]}[intent]
    if rng.random() < 0.35:  # the player speaks the language itself
        return rng.choice(qs).format(**fill), lang, lang, a, expected, en_answer
    q_en = rng.choice(FOREIGN_EN_QUESTIONS[intent]).format(item=item.name, a_item=article(item.name))
    tpl = rng.choice(LANGUAGE_REQUESTS)
    q = tpl.format(q=q_en, q_lower=q_en[:1].lower() + q_en[1:], lang=LANGUAGE_NAMES[lang])
    return q, "en", lang, a, expected, en_answer


def generate_one(rng: random.Random, index: int) -> Dialogue:
    """Draw one dialogue turn (category, persona, texts, controls)."""
    while True:
        category = rng.choices(CATEGORIES, weights=[CATEGORY_WEIGHTS[c] for c in CATEGORIES])[0]
        role = rng.choices(list(PERSONA_WEIGHTS), weights=list(PERSONA_WEIGHTS.values()))[0]
        if role == "tea_seller" and category not in TEA_SELLER_CATEGORIES:
            continue
        break
    persona = PERSONAS[role]
    did = f"d{index:06d}"
    history: list[dict] = []
    q_lang, language, accent, voice = "en", persona.language, persona.accent, persona.voice
    controls = default_controls(rng, persona)
    extra: dict = {}
    if role == "tea_seller":
        q, q_lang, a, expected, rej = _tea_seller(rng, category)
    elif category == "language":
        q, q_lang, language, a, expected, rej = _language(rng, persona)
        accent, voice = "standard", LANGUAGE_VOICES[language]
        controls = {"emotion": persona.default_emotion, "speed": 1.0, "pitch_st": 0.0}
    elif category == "multiturn":
        history, q, a, expected, rej = gen_multiturn(rng, persona)
    elif category == "control":
        base = rng.choice(("greeting", "price", "price", "directions", "facts", "smalltalk", "time", "farewell", "arithmetic"))
        q, a, expected, _ = BASE_GENERATORS[base](rng, persona)
        phrase, change = rng.choice(CONTROL_REQUESTS)
        controls = {"emotion": persona.default_emotion, "speed": 1.0, "pitch_st": 0.0}
        if "accent" in change:
            spec_gender = {"gb_female": "f"}.get(persona.voice, "m")
            accent = change["accent"]
            voice = ACCENT_VOICES[accent][spec_gender]
            if accent == persona.accent:  # asked for the accent it already has: still a valid request
                voice = persona.voice
        controls.update({k: v for k, v in change.items() if k in ("emotion", "speed", "pitch_st")})
        if change.get("whisper"):
            extra["whisper"] = True
        q = rng.choice((f"{q} {phrase}", f"{phrase} {q}"))
        rej = rng.choice(GENERIC_DEFLECTIONS)
    else:
        q, a, expected, rej = BASE_GENERATORS[category](rng, persona)
    if rej == a:
        rej = rng.choice(GENERIC_DEFLECTIONS)
    return Dialogue(id=did, split=split_of(q), category=category, persona=role, npc_voice=voice, language=language,
                    accent=accent, controls=controls, history=history, question_text=q, question_language=q_lang,
                    answer_text=a, expected=expected, rejected_text=rej, extra=extra)


PREFIX_STABLE_FROM = 200  # from this size on, a corpus of n turns is the first n turns of any larger one


def generate_dialogues(n: int, seed: int = 0) -> list[Dialogue]:
    """n dialogue turns, deterministic for a seed. From PREFIX_STABLE_FROM turns on they are the first n of one
    seeded stream (splits by question hash, about SPLIT_FRACTIONS); below that each split is filled to its share
    (at least one each) so tiny corpora still have all three splits."""
    rng = random.Random(f"npc-corpus-text:{seed}")
    if n >= PREFIX_STABLE_FROM:
        return [generate_one(rng, i) for i in range(n)]
    quotas = {s: max(1, round(n * f)) for s, f in SPLIT_FRACTIONS.items()}
    quotas["train"] = max(1, n - quotas["valid"] - quotas["heldout"])
    out: list[Dialogue] = []
    counts = dict.fromkeys(quotas, 0)
    index = 0
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10000:
            raise RuntimeError("could not fill the split quotas; check SPLIT_FRACTIONS")
        d = generate_one(rng, index)
        if counts[d.split] >= quotas[d.split]:
            continue
        counts[d.split] += 1
        d.id = f"d{len(out):06d}"
        out.append(d)
        index += 1
    return out
