"""Persona YAML files: schema, strict validation with file/field/line errors, a hot-reloading store, and a CLI."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from npc_server.controls import ACCENTS, EMOTIONS, LANGUAGES, PITCH_RANGE_ST, ROLES, SPEED_RANGE
from npc_server.voices import VOICE_BANK

log = logging.getLogger("npc_server.personas")

ID_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
MAX_TEXT_CHARS = 2000  # backstory / goals / knowledge each
MAX_ANSWER_SECONDS = (1.0, 60.0)


class PersonaError(ValueError):
    """A persona file is invalid. `str()` reads `file:line: field: message`."""

    def __init__(self, file: str, field_name: str, line: int | None, message: str):
        self.file, self.field, self.line, self.message = file, field_name, line, message
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {field_name}: {message}" if field_name else f"{where}: {message}")


@dataclass(frozen=True)
class Voice:
    timbre: str
    pitch: float = 0.0  # semitones relative to the timbre's natural pitch
    speed: float = 1.0  # tempo factor


@dataclass(frozen=True)
class Persona:
    id: str
    name: str
    role: str
    backstory: str
    goals: str
    knowledge: str
    language: str
    accent: str
    voice: Voice
    default_emotion: str
    allowed_emotions: tuple[str, ...]
    greeting: str
    max_answer_seconds: float = 15.0
    source: str = ""  # file it was loaded from

    def summary(self) -> dict:
        """The public fields clients see (ListPersonas / the bridge's `personas` frame)."""
        return {
            "id": self.id, "name": self.name, "role": self.role, "language": self.language, "accent": self.accent,
            "voice": self.voice.timbre, "pitch": self.voice.pitch, "speed": self.voice.speed,
            "default_emotion": self.default_emotion, "allowed_emotions": list(self.allowed_emotions),
            "greeting": self.greeting,
        }

    def prompt_text(self) -> str:
        """The persona text the backbone is conditioned on (system turn)."""
        return (
            f"You are {self.name}, the {self.role.replace('_', ' ')}. {self.backstory} "
            f"Goals: {self.goals} Knowledge: {self.knowledge}"
        ).strip()


# ---- schema -------------------------------------------------------------------------------------------------
# Each field: (python type(s), required, validator or None). Validators return an error message or None.


def _in_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo:g} and {hi:g}, got {v:g}"


def _nonempty(max_chars: int) -> Callable[[Any], str | None]:
    def check(v: str) -> str | None:
        if not v.strip():
            return "must not be empty"
        if len(v) > max_chars:
            return f"is {len(v)} characters long; the limit is {max_chars}"
        return None

    return check


def _one_of(options, what: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"unknown {what} {v!r}; known: {', '.join(options)}"


_NUMBER = (int, float)

TOP_FIELDS: dict[str, tuple[Any, bool, Callable[[Any], str | None] | None]] = {
    "id": (str, True, lambda v: None if ID_PATTERN.match(v) else "must be lowercase letters, digits, '_' or '-' (max 64), starting with a letter"),
    "name": (str, True, _nonempty(80)),
    "role": (str, True, _one_of(ROLES, "role")),
    "backstory": (str, True, _nonempty(MAX_TEXT_CHARS)),
    "goals": (str, False, _nonempty(MAX_TEXT_CHARS)),
    "knowledge": ((str, list), False, None),
    "language": (str, True, _one_of(tuple(LANGUAGES), "language")),
    "accent": (str, False, None),
    "voice": (dict, True, None),
    "emotion": (dict, False, None),
    "greeting": (str, True, _nonempty(300)),
    "max_answer_seconds": (_NUMBER, False, _in_range(*MAX_ANSWER_SECONDS)),
}
VOICE_FIELDS = {
    "timbre": (str, True, _one_of(tuple(VOICE_BANK), "voice timbre")),
    "pitch": (_NUMBER, False, _in_range(*PITCH_RANGE_ST)),
    "speed": (_NUMBER, False, _in_range(*SPEED_RANGE)),
}
EMOTION_FIELDS = {
    "default": (str, False, _one_of(tuple(EMOTIONS), "emotion")),
    "allowed": (list, False, None),
}

_TYPE_NAMES = {str: "text", int: "a number", float: "a number", list: "a list", dict: "a mapping", bool: "true/false"}


def _type_name(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(dict.fromkeys(_TYPE_NAMES.get(x, x.__name__) for x in ts))


def _construct(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _check_mapping(
    file: str, prefix: str, node: yaml.Node, schema: dict, line_of_parent: int | None
) -> dict[str, tuple[Any, int]]:
    """Validate a mapping node against a schema -> {key: (value, line)}; raises PersonaError on the first error."""
    if not isinstance(node, yaml.MappingNode):
        raise PersonaError(file, prefix or "(top level)", node.start_mark.line + 1, "must be a mapping of field: value")
    out: dict[str, tuple[Any, int]] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(_construct(key_node))
        line = key_node.start_mark.line + 1
        name = f"{prefix}.{key}" if prefix else str(key)
        if key in out:
            raise PersonaError(file, name, line, "is given twice")
        if key not in schema:
            raise PersonaError(file, name, line, f"unknown field; allowed here: {', '.join(schema)}")
        typ, _, validator = schema[key]
        if isinstance(value_node, yaml.MappingNode):
            value: Any = value_node  # nested mappings are checked by the caller
            ok = typ is dict or (isinstance(typ, tuple) and dict in typ)
        else:
            value = _construct(value_node)
            ts = typ if isinstance(typ, tuple) else (typ,)
            ok = isinstance(value, ts) and not isinstance(value, bool)
        if not ok:
            got = "a mapping" if isinstance(value_node, yaml.MappingNode) else f"{type(value).__name__} {value!r}"
            raise PersonaError(file, name, line, f"must be {_type_name(typ)}, got {got}")
        if validator is not None:
            msg = validator(value)
            if msg:
                raise PersonaError(file, name, line, msg)
        out[key] = (value, line)
    for key, (_, required, _) in schema.items():
        if required and key not in out:
            name = f"{prefix}.{key}" if prefix else key
            raise PersonaError(file, name, line_of_parent, "is required but missing")
    return out


def parse_persona(text: str, file: str = "<string>") -> Persona:
    """Parse and validate one persona YAML document. Raises PersonaError naming file, field and line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PersonaError(file, "", line, f"YAML syntax error: {problem}") from None
    if root is None:
        raise PersonaError(file, "", 1, "file is empty")
    top = _check_mapping(file, "", root, TOP_FIELDS, 1)

    voice_node, voice_line = top["voice"]
    voice = _check_mapping(file, "voice", voice_node, VOICE_FIELDS, voice_line)

    emotion: dict[str, tuple[Any, int]] = {}
    if "emotion" in top:
        emotion = _check_mapping(file, "emotion", top["emotion"][0], EMOTION_FIELDS, top["emotion"][1])

    language = top["language"][0]
    accent, accent_line = top.get("accent", (ACCENTS[language][0], top["language"][1]))
    if accent not in ACCENTS[language]:
        raise PersonaError(
            file, "accent", accent_line,
            f"unknown accent {accent!r} for language {language!r}; known: {', '.join(ACCENTS[language])}",
        )
    timbre, timbre_line = voice["timbre"]
    spec = VOICE_BANK[timbre]
    if accent not in spec.languages.get(language, ()):
        can = "; ".join(f"{lang} ({', '.join(acc)})" for lang, acc in spec.languages.items())
        raise PersonaError(
            file, "voice.timbre", timbre_line,
            f"voice {timbre!r} cannot speak {language}/{accent}; it speaks: {can}",
        )

    default_emotion = emotion.get("default", ("neutral", None))[0]
    allowed_line = emotion.get("allowed", (None, top.get("emotion", (None, None))[1]))[1]
    allowed_raw = emotion.get("allowed", (list(EMOTIONS), None))[0]
    for item in allowed_raw:
        if not isinstance(item, str) or item not in EMOTIONS:
            raise PersonaError(
                file, "emotion.allowed", allowed_line, f"unknown emotion {item!r}; known: {', '.join(EMOTIONS)}"
            )
    if default_emotion not in allowed_raw:
        raise PersonaError(
            file, "emotion.default", emotion.get("default", (None, allowed_line))[1],
            f"{default_emotion!r} is not in emotion.allowed ({', '.join(allowed_raw)})",
        )

    knowledge_value, knowledge_line = top.get("knowledge", ("", None))
    if isinstance(knowledge_value, list):
        if not all(isinstance(k, str) for k in knowledge_value):
            raise PersonaError(file, "knowledge", knowledge_line, "must be text or a list of texts")
        knowledge_value = " ".join(k.strip() for k in knowledge_value)
    if len(knowledge_value) > MAX_TEXT_CHARS * 2:
        raise PersonaError(
            file, "knowledge", knowledge_line, f"is {len(knowledge_value)} characters; limit {MAX_TEXT_CHARS * 2}"
        )

    return Persona(
        id=top["id"][0],
        name=top["name"][0].strip(),
        role=top["role"][0],
        backstory=top["backstory"][0].strip(),
        goals=top.get("goals", ("", None))[0].strip(),
        knowledge=knowledge_value.strip(),
        language=language,
        accent=accent,
        voice=Voice(timbre=timbre, pitch=float(voice.get("pitch", (0.0, 0))[0]), speed=float(voice.get("speed", (1.0, 0))[0])),
        default_emotion=default_emotion,
        allowed_emotions=tuple(allowed_raw),
        greeting=top["greeting"][0].strip(),
        max_answer_seconds=float(top.get("max_answer_seconds", (15.0, 0))[0]),
        source=file,
    )


def load_persona(path: str | Path) -> Persona:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonaError(str(path), "", None, f"cannot read file: {exc}") from None
    return parse_persona(text, str(path))


def load_folder(folder: str | Path) -> tuple[dict[str, Persona], list[PersonaError]]:
    """Load every *.yaml / *.yml in a folder -> (personas by id, errors). Duplicate ids are errors."""
    personas: dict[str, Persona] = {}
    errors: list[PersonaError] = []
    for path in sorted(Path(folder).glob("*.y*ml")):
        try:
            p = load_persona(path)
        except PersonaError as exc:
            errors.append(exc)
            continue
        if p.id in personas:
            errors.append(PersonaError(str(path), "id", None, f"id {p.id!r} is already used by {personas[p.id].source}"))
            continue
        personas[p.id] = p
    return personas, errors


@dataclass
class ReloadResult:
    loaded: list[str] = field(default_factory=list)  # ids now served
    changed: list[str] = field(default_factory=list)  # ids added or modified by this reload
    removed: list[str] = field(default_factory=list)
    errors: list[PersonaError] = field(default_factory=list)


class PersonaStore:
    """Thread-safe personas of a folder with hot reload.

    A file that breaks keeps serving its last good version (nothing is lost); its error is reported.
    A file that is deleted stops being served.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"personas folder {self.folder} does not exist")
        self._lock = threading.Lock()
        self._personas: dict[str, Persona] = {}
        self._by_file: dict[str, str] = {}  # file -> id of its last good version
        self._mtimes: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_errors: list[PersonaError] = []
        self.reload()

    def get(self, persona_id: str) -> Persona:
        with self._lock:
            if persona_id not in self._personas:
                known = ", ".join(sorted(self._personas)) or "none"
                raise KeyError(f"unknown NPC {persona_id!r}; known: {known}")
            return self._personas[persona_id]

    def all(self) -> list[Persona]:
        with self._lock:
            return sorted(self._personas.values(), key=lambda p: p.id)

    def _snapshot(self) -> dict[str, float | None]:
        """Persona files -> modification time; None for one that cannot be looked at (a dangling symlink, a file
        deleted since the listing): `reload()` then reports it as an error and goes on."""
        snapshot: dict[str, float | None] = {}
        for p in sorted(self.folder.glob("*.y*ml")):
            try:
                snapshot[str(p)] = p.stat().st_mtime
            except OSError:
                snapshot[str(p)] = None
        return snapshot

    def reload(self) -> ReloadResult:
        result = ReloadResult()
        mtimes = self._snapshot()
        with self._lock:
            old = dict(self._personas)
            new_by_file: dict[str, str] = {}
            new: dict[str, Persona] = {}
            errors: list[PersonaError] = []
            for file in mtimes:
                try:
                    p = load_persona(file)
                except PersonaError as exc:
                    errors.append(exc)
                    kept = self._by_file.get(file)
                    if kept is not None and kept in old:  # keep the last good version of a broken file
                        new[kept], new_by_file[file] = old[kept], kept
                    continue
                if p.id in new:
                    errors.append(PersonaError(file, "id", None, f"id {p.id!r} is already used by {new[p.id].source}"))
                    continue
                new[p.id], new_by_file[file] = p, p.id
            result.changed = sorted(i for i, p in new.items() if old.get(i) != p)
            result.removed = sorted(set(old) - set(new))
            result.loaded = sorted(new)
            result.errors = errors
            self._personas, self._by_file, self._mtimes = new, new_by_file, mtimes
            self.last_errors = errors
        return result

    def watch(self, interval: float = 1.0, on_reload: Callable[[ReloadResult], None] | None = None) -> None:
        """Poll the folder in a daemon thread and reload when a file is added, changed or removed."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    if self._snapshot() != self._mtimes:
                        res = self.reload()
                        for err in res.errors:
                            log.error("persona error: %s", err)
                        if on_reload is not None:
                            on_reload(res)
                except Exception:  # noqa: BLE001 - the watcher must outlive anything a folder can do to it
                    log.exception("reloading personas from %s failed; still watching", self.folder)

        self._thread = threading.Thread(target=loop, name="persona-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def main(argv: list[str]) -> int:
    """`npc-server personas`: validate a personas folder (or files) and list what would be served."""
    from npc_server.paths import DEFAULT_PERSONAS_DIR

    ap = argparse.ArgumentParser(prog="npc-server personas", description=main.__doc__)
    ap.add_argument("paths", nargs="*", help=f"persona files or folders (default: {DEFAULT_PERSONAS_DIR})")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.paths] or [DEFAULT_PERSONAS_DIR]
    personas: list[Persona] = []
    errors: list[PersonaError] = []
    for path in paths:
        if path.is_dir():
            found, errs = load_folder(path)
            personas += found.values()
            errors += errs
        else:
            try:
                personas.append(load_persona(path))
            except PersonaError as exc:
                errors.append(exc)
    for p in personas:
        print(
            f"{p.id:<14} {p.name:<16} {p.role:<12} {p.language}/{p.accent:<9} voice={p.voice.timbre} "
            f"pitch={p.voice.pitch:+g}st speed={p.voice.speed:g} emotion={p.default_emotion}"
        )
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    print(f"{len(personas)} persona(s) valid, {len(errors)} error(s)")
    return 1 if errors else 0
