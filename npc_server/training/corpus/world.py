"""The fixed game world of the corpus: the town of Oakvale, its personas, places, items, characters and facts."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Place:
    id: str
    name: str  # as used inside a sentence ("the smithy by the river")
    directions: str  # full sentence: how to get there from the middle of town
    minutes: int  # walking minutes from the market square
    opens: str | None  # None: always open
    closes: str | None
    keyword: str  # a word a correct directions answer must contain
    translations: dict[str, str] = field(default_factory=dict)  # language -> name


@dataclass(frozen=True)
class Item:
    id: str
    name: str  # singular, without article
    plural: str
    price: int  # gold
    seller: str  # persona role id
    translations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Character:
    id: str
    name: str
    pronoun: str  # "he" | "she"
    age: int
    job: str  # "runs the smithy by the river"
    place: str  # place id where to find them
    likes: str  # "fishing on the river"
    fact: str  # one more sentence about them
    persona: str | None = None  # persona role id when the character is one of the speaking NPCs


@dataclass(frozen=True)
class Persona:
    role: str
    name: str
    workplace: str  # place id
    voice: str  # voice-bank id
    language: str
    accent: str
    default_emotion: str
    greetings: tuple[str, ...]
    farewells: tuple[str, ...]
    smalltalk: dict[str, tuple[str, ...]]  # topic -> possible answers


PLACES: dict[str, Place] = {
    p.id: p
    for p in [
        Place("inn", "The Sleepy Otter", "The Sleepy Otter is on the west side of the market square, by the town well.",
              1, None, None, "west side", {"ja": "ねむいカワウソ", "yue": "瞌睡水獺旅館", "cmn": "ke1 shui4 shui3 ta3 lv3 guan3"}),
        Place("gate", "the north gate", "Follow the main road north from the market square and you will reach the north gate.",
              5, "six in the morning", "ten at night", "main road north", {"ja": "きたもん", "yue": "北門", "cmn": "bei3 men2"}),
        Place("market", "the market square", "The market square is right in the middle of town.",
              0, "eight in the morning", "six in the evening", "middle of town", {"ja": "いちば", "yue": "市集", "cmn": "shi4 ji2"}),
        Place("smithy", "the smithy by the river", "The smithy is down by the river, just past the stone bridge, south of the market.",
              4, "seven in the morning", "five in the evening", "past the stone bridge", {"ja": "かじや", "yue": "鐵匠舖", "cmn": "tie3 jiang4 pu4"}),
        Place("chapel", "the chapel", "The chapel is on the hill, east of the market square.",
              6, "six in the morning", "eight in the evening", "on the hill", {"ja": "きょうかい", "yue": "教堂", "cmn": "jiao4 tang2"}),
        Place("mill", "the old mill", "The old mill is outside town: cross the stone bridge and follow the river west.",
              15, None, None, "follow the river west", {"ja": "ふるい すいしゃごや", "yue": "舊磨坊", "cmn": "jiu4 mo4 fang2"}),
        Place("bakery", "the bakery", "The bakery is on the north side of the market square.",
              1, "five in the morning", "noon", "north side", {"ja": "パンや", "yue": "麵包舖", "cmn": "mian4 bao1 dian4"}),
        Place("bridge", "the stone bridge", "The stone bridge is south of the market square, over the river.",
              3, None, None, "over the river", {"ja": "いしの はし", "yue": "石橋", "cmn": "shi2 qiao2"}),
        Place("tower", "the watchtower", "The watchtower stands right beside the north gate.",
              6, None, None, "beside the north gate", {"ja": "みはりやぐら", "yue": "瞭望塔", "cmn": "liao4 wang4 ta3"}),
        Place("well", "the town well", "The town well is in the west corner of the market square, in front of the inn.",
              1, None, None, "west corner", {"ja": "いど", "yue": "水井", "cmn": "shui3 jing3"}),
    ]
}

ITEMS: dict[str, Item] = {
    i.id: i
    for i in [
        Item("bread", "loaf of bread", "loaves of bread", 2, "merchant", {"ja": "パン", "yue": "麵包", "cmn": "mian4 bao1"}),
        Item("apple", "apple", "apples", 1, "merchant", {"ja": "りんご", "yue": "蘋果", "cmn": "ping2 guo3"}),
        Item("cheese", "wheel of cheese", "wheels of cheese", 4, "merchant", {"ja": "チーズ", "yue": "芝士", "cmn": "nai3 lao4"}),
        Item("rope", "coil of rope", "coils of rope", 3, "merchant", {"ja": "ロープ", "yue": "繩", "cmn": "sheng2 zi5"}),
        Item("lantern", "lantern", "lanterns", 6, "merchant", {"ja": "ランタン", "yue": "燈籠", "cmn": "deng1 long2"}),
        Item("torch", "torch", "torches", 1, "merchant", {"ja": "たいまつ", "yue": "火把", "cmn": "huo3 ba3"}),
        Item("map", "map of the valley", "maps of the valley", 8, "merchant", {"ja": "ちず", "yue": "地圖", "cmn": "di4 tu2"}),
        Item("blanket", "wool blanket", "wool blankets", 5, "merchant", {"ja": "もうふ", "yue": "氈", "cmn": "tan3 zi5"}),
        Item("rod", "fishing rod", "fishing rods", 7, "merchant", {"ja": "つりざお", "yue": "魚竿", "cmn": "yu2 gan1"}),
        Item("potion", "healing potion", "healing potions", 15, "merchant", {"ja": "かいふくやく", "yue": "藥水", "cmn": "yao4 shui3"}),
        Item("sword", "iron sword", "iron swords", 25, "blacksmith", {"ja": "てつの けん", "yue": "鐵劍", "cmn": "tie3 jian4"}),
        Item("dagger", "steel dagger", "steel daggers", 12, "blacksmith", {"ja": "たんけん", "yue": "匕首", "cmn": "bi3 shou3"}),
        Item("shield", "wooden shield", "wooden shields", 10, "blacksmith", {"ja": "きの たて", "yue": "木盾", "cmn": "mu4 dun4"}),
        Item("helmet", "iron helmet", "iron helmets", 18, "blacksmith", {"ja": "かぶと", "yue": "頭盔", "cmn": "tou2 kui1"}),
        Item("horseshoe", "horseshoe", "horseshoes", 4, "blacksmith", {"ja": "ていてつ", "yue": "馬蹄鐵", "cmn": "ma3 ti2 tie3"}),
        Item("axe", "axe", "axes", 9, "blacksmith", {"ja": "おの", "yue": "斧頭", "cmn": "fu3 tou5"}),
        Item("room", "room for the night", "rooms for the night", 5, "innkeeper", {"ja": "へや", "yue": "房", "cmn": "fang2 jian1"}),
        Item("stew", "bowl of stew", "bowls of stew", 3, "innkeeper", {"ja": "シチュー", "yue": "燉肉", "cmn": "dun4 rou4"}),
        Item("ale", "mug of ale", "mugs of ale", 2, "innkeeper", {"ja": "ビール", "yue": "啤酒", "cmn": "pi2 jiu3"}),
        Item("green_tea", "cup of green tea", "cups of green tea", 3, "tea_seller", {"ja": "りょくちゃ", "yue": "綠茶", "cmn": "lv4 cha2"}),
        Item("jasmine_tea", "cup of jasmine tea", "cups of jasmine tea", 4, "tea_seller", {"ja": "ジャスミンちゃ", "yue": "茉莉花茶", "cmn": "mo4 li4 hua1 cha2"}),
    ]
}

CHARACTERS: dict[str, Character] = {
    c.id: c
    for c in [
        Character("greta", "Greta", "she", 52, "runs The Sleepy Otter", "inn", "apple cider",
                  "She has run the inn for twenty years.", "innkeeper"),
        Character("angus", "Sergeant Angus", "he", 45, "guards the north gate", "gate", "bagpipe music",
                  "He came to Oakvale from the highlands.", "guard"),
        Character("tomas", "Tomas", "he", 38, "sells goods in the market square", "market", "counting his coins",
                  "He travels to the city twice a year to buy goods.", "merchant"),
        Character("bram", "Bram", "he", 60, "works at the smithy by the river", "smithy", "fishing in the river",
                  "He has two daughters.", "blacksmith"),
        Character("maren", "Elder Maren", "she", 78, "looks after the chapel", "chapel", "old books",
                  "She lost her silver ring in the old mill.", "quest_giver"),
        Character("finn", "Finn", "he", 19, "travels with you", "inn", "stories about knights",
                  "He wants to become a knight one day.", "companion"),
        Character("aiko", "Aiko", "she", 27, "sells tea from her cart by the town well", "well", "jasmine tea",
                  "She is a travelling tea seller from the east.", "tea_seller"),
        Character("lily", "Lily", "she", 24, "runs the bakery", "bakery", "honey cakes",
                  "She bakes the best honey cakes in the valley."),
        Character("hugo", "Old Hugo", "he", 70, "used to run the old mill", "inn", "telling ghost stories",
                  "He says the old mill is haunted."),
        Character("rowan", "Captain Rowan", "she", 41, "commands the watchtower", "tower", "sharp swords",
                  "She watches the road for bandits."),
    ]
}

QUEST = {
    "giver": "quest_giver",
    "item": "silver ring",
    "place": "mill",
    "reward": 50,
    "summary": "Elder Maren lost her silver ring in the old mill. Whoever finds it gets fifty gold.",
}

PERSONAS: dict[str, Persona] = {
    p.role: p
    for p in [
        Persona(
            "innkeeper", "Greta", "inn", "gb_female", "en", "gb", "happy",
            ("Welcome to The Sleepy Otter, traveller! I'm Greta. Do you need a room or a warm meal?",
             "Come in, come in! The fire is warm and the stew is hot.",
             "Hello there! Welcome to The Sleepy Otter. What can I get you?"),
            ("Safe travels, dear. Come back soon!", "Goodbye! Your room will be waiting.", "Off you go then. Mind the cold!"),
            {"how_are_you": ("I'm very well, thank you. The inn is busy tonight.", "Tired, but happy. Business is good."),
             "name": ("I'm Greta. I run The Sleepy Otter.",),
             "job": ("I run The Sleepy Otter. I cook, I clean, and I listen to everyone's stories.",),
             "news": ("They say Old Hugo saw lights in the old mill again.", "Elder Maren is looking for someone brave. Ask her at the chapel."),
             "weather": ("Rain again, I think. Good weather for staying by the fire.",)},
        ),
        Persona(
            "guard", "Sergeant Angus", "gate", "scot_male", "en", "scotland", "neutral",
            ("Halt! State your business at the north gate.", "Aye, traveller. Welcome to Oakvale. Keep out of trouble.",
             "Good day. I'm Sergeant Angus. Nobody passes this gate without me knowing."),
            ("Off with you, and stay safe on the road.", "Farewell. Keep your sword close.", "Aye, goodbye. The gate closes at ten."),
            {"how_are_you": ("Cold and tired, but the gate is safe.", "Fine, fine. Quiet day, which is how I like it."),
             "name": ("Sergeant Angus, guard of the north gate.",),
             "job": ("I guard the north gate. Nobody comes in without my say.",),
             "news": ("Bandits were seen on the north road. Be careful out there.", "Captain Rowan doubled the watch on the tower."),
             "weather": ("Wind from the north. It will be a cold night.",)},
        ),
        Persona(
            "merchant", "Tomas", "market", "joe_high", "en", "us", "excited",
            ("Welcome, welcome! Best prices in the valley, my friend!", "Hello! I'm Tomas. Rope, lanterns, maps, you name it, I have it!",
             "Ah, a customer! Come and look at my goods."),
            ("Thank you, come again!", "Goodbye, my friend! Tell everyone about my prices!", "Safe travels, and remember Tomas!"),
            {"how_are_you": ("Wonderful! Business is good today.", "Very well! I sold ten lanterns this morning."),
             "name": ("Tomas, the finest merchant in Oakvale!",),
             "job": ("I sell goods in the market square. Bread, rope, lanterns, potions, everything!",),
             "news": ("Prices are going up in the city, so buy now!", "Bram made a new iron sword. Go and see it at the smithy."),
             "weather": ("Sunny! A good day for business.",)},
        ),
        Persona(
            "blacksmith", "Bram", "smithy", "joe_low", "en", "us", "calm",
            ("Hmm. Welcome to the smithy. Need something forged?", "Hello. I'm Bram. Swords, shields, axes. Take a look.",
             "Good day. Careful, the forge is hot."),
            ("Goodbye. Keep your blade sharp.", "Farewell. Come back when it needs mending.", "Take care out there."),
            {"how_are_you": ("Busy. The forge never rests.", "Well enough. My arms are tired."),
             "name": ("Bram. I'm the blacksmith.",),
             "job": ("I work at the smithy by the river. I make swords, shields and horseshoes.",),
             "news": ("The guards ordered ten new helmets. Something is coming.", "The river is high this week."),
             "weather": ("Hot in here, whatever the weather outside.",)},
        ),
        Persona(
            "quest_giver", "Elder Maren", "chapel", "joe", "en", "us", "sad",
            ("Welcome, child. Peace be with you.", "Ah, a new face. I am Elder Maren. I may need your help.",
             "Hello, traveller. Come in, the chapel is open to all."),
            ("Go in peace, child.", "Farewell. May the road be kind to you.", "Goodbye. Please remember my ring."),
            {"how_are_you": ("I am old and tired, but I am well.", "Worried. I still have not found my ring."),
             "name": ("I am Elder Maren. I look after the chapel.",),
             "job": ("I look after the chapel and the people of Oakvale.",),
             "news": ("I lost my silver ring in the old mill. I am too old to go there myself.",),
             "weather": ("The wind is cold today. Winter is coming.",)},
        ),
        Persona(
            "companion", "Finn", "inn", "joe", "en", "us", "happy",
            ("Hey! Ready for another adventure?", "There you are! Where are we going today?", "Hi! I'm right here with you."),
            ("See you soon! Don't go without me.", "Bye! I'll wait at the inn.", "Goodbye, friend!"),
            {"how_are_you": ("Great! A bit hungry, though.", "I'm fine! Can we go to the old mill?"),
             "name": ("It's me, Finn! Your friend!",),
             "job": ("I travel with you. One day I will be a knight!",),
             "news": ("I heard the old mill is haunted. Let's go and see!", "Lily made fresh honey cakes at the bakery."),
             "weather": ("It looks like rain. Good thing we have a blanket.",)},
        ),
        Persona(
            "tea_seller", "Aiko", "well", "ja_female", "ja", "standard", "calm",
            ("いらっしゃいませ。 おいしい おちゃ わ いかがですか？", "こんにちわ。 わたしわ アイコです。 おちゃを どうぞ。"),
            ("ありがとう ございました。 また きてね。", "さようなら。 きを つけて。"),
            {"how_are_you": ("げんきです。 ありがとう。",),
             "name": ("わたしわ アイコです。 おちゃを うって います。",),
             "job": ("ひがしの くにから きました。 おちゃを うって います。",),
             "news": ("きょうわ ジャスミンちゃが おいしいです。",),
             "weather": ("いい てんきですね。",)},
        ),
    ]
}

# The languages a player can ask for, with the voice that answers in them.
LANGUAGE_VOICES = {"ja": "ja_female", "yue": "yue_male", "cmn": "cmn_female"}
LANGUAGE_NAMES = {"ja": "Japanese", "yue": "Cantonese", "cmn": "Mandarin"}
# Accent requests: accent -> voice for a male / female speaker.
ACCENT_VOICES = {"scotland": {"m": "scot_male", "f": "gb_female"}, "gb": {"m": "scot_male", "f": "gb_female"},
                 "us": {"m": "joe", "f": "joe"}}
ACCENT_NAMES = {"scotland": "Scottish", "gb": "British", "us": "American"}

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_en(n: int) -> str:
    """Below a million, in English words ("forty-two", "one hundred and five"; eval.metrics.number_words reads
    transcripts with it)."""
    if n < 0:
        return "minus " + number_en(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_en(rest))
    if n < 1_000_000:
        rest = n % 1000
        sep = " and " if 0 < rest < 100 else " "
        return number_en(n // 1000) + " thousand" + ("" if rest == 0 else sep + number_en(rest))
    raise ValueError(f"number {n} out of range")


_JA_DIGITS = ["", "いち", "に", "さん", "よん", "ご", "ろく", "なな", "はち", "きゅう"]
_JA_HUNDREDS = ["", "ひゃく", "にひゃく", "さんびゃく", "よんひゃく", "ごひゃく", "ろっぴゃく", "ななひゃく", "はっぴゃく", "きゅうひゃく"]


def number_ja(n: int) -> str:
    """1..999 in kana."""
    if not 0 < n < 1000:
        raise ValueError(f"number {n} out of range for Japanese")
    h, t, o = n // 100, (n // 10) % 10, n % 10
    out = _JA_HUNDREDS[h]
    if t:
        out += ("" if t == 1 else _JA_DIGITS[t]) + "じゅう"
    return out + _JA_DIGITS[o]


_ZH_DIGITS = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"]
_PY_DIGITS = ["ling2", "yi1", "er4", "san1", "si4", "wu3", "liu4", "qi1", "ba1", "jiu3"]


def number_yue(n: int) -> str:
    """1..99 in Chinese characters (read in Cantonese)."""
    if not 0 < n < 100:
        raise ValueError(f"number {n} out of range for Cantonese")
    t, o = divmod(n, 10)
    out = ("" if t <= 1 else _ZH_DIGITS[t]) + ("十" if t else "")
    return out + (_ZH_DIGITS[o] if o else "")


def number_cmn(n: int, measure: bool = True) -> str:
    """1..99 in tone-numbered pinyin; before a measure word 2 is liang3."""
    if not 0 < n < 100:
        raise ValueError(f"number {n} out of range for Mandarin")
    if n == 2 and measure:
        return "liang3"
    t, o = divmod(n, 10)
    parts = []
    if t:
        if t > 1:
            parts.append(_PY_DIGITS[t])
        parts.append("shi2")
    if o:
        parts.append(_PY_DIGITS[o])
    return " ".join(parts)


def gold(n: int, language: str = "en") -> str:
    """A price in the given language: "five gold", "ごゴールド", "五個金幣", "wu3 ge4 jin1 bi4"."""
    if language == "en":
        return f"{number_en(n)} gold"
    if language == "ja":
        return f"{number_ja(n)}ゴールド"
    if language == "yue":
        return f"{number_yue(n)}個金幣"
    if language == "cmn":
        return f"{number_cmn(n)} ge4 jin1 bi4"
    raise ValueError(f"unknown language {language!r}")


def items_sold_by(role: str) -> list[Item]:
    return [i for i in ITEMS.values() if i.seller == role]


def character_of(role: str) -> Character:
    for c in CHARACTERS.values():
        if c.persona == role:
            return c
    raise KeyError(role)
