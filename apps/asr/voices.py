"""Text-to-speech voices from Debian's packages, as synthesis commands.

Each :class:`Voice` turns a sentence into a WAV file with one engine and one
setting of voice, variant, rate and pitch.  Whole voices are held out for
validation (:func:`split_voices`), so validation measures unseen voices.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Voice", "catalogue", "split_voices", "synthesize", "SynthesisError"]

ESPEAK_BASES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                "en-gb-x-gbcwmd", "en-029"]  # fmt: skip
# Human-sounding espeak-ng variants (the robotic and whisper ones are left out).
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
                   "klatt", "klatt2", "klatt3", "adam", "Alex", "Alicia", "Andrea", "Andy",
                   "Annie", "aunty", "belinda", "benjamin", "caleb", "david", "ed", "edward",
                   "Gene", "john", "linda", "max", "Michael", "Mike", "paul", "quincy", "rob",
                   "robert", "steph", "travis", "victor", "norbert", "shelby",
                   "grandpa"]  # fmt: skip
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]
FESTIVAL_VOICES = ["kal_diphone"]
# Release 2: more natural voices (diphone, MBROLA, HTS and SVOX Pico), from
# festvox-*, mbrola-*, rhvoice-english and (Debian non-free) libttspico-utils.
# A later release never moves a voice of an earlier one between training and
# validation (see split_voices), so a model trained on release 1 can go on.
FESTIVAL_VOICES_2 = ["ked_diphone", "rab_diphone", "don_diphone", "us1_mbrola", "us2_mbrola",
                     "us3_mbrola", "en1_mbrola", "cmu_us_slt_arctic_hts"]  # fmt: skip
RHVOICE_VOICES = ["alan", "bdl", "clb", "slt", "evgeniy-eng"]
PICO_VOICES = ["en-US", "en-GB"]
# Release 3: human-recorded MBROLA diphone voices of other languages (six
# German speakers, three of them women, one Greek, one Romanian) speaking
# English through espeak-ng's phoneme mappings: accented, but new timbres.
# MBROLA's English voices are left out here: us1 is a held-out voice of
# release 2, so speaking through it would leak that voice into training.
MBROLA_VOICES = ["de1", "de2", "de3", "de4", "de5", "de6", "gr2", "ro1"]
# Release 4: the rest of espeak-ng's mb-<db>-en voices (Debian mbrola-<db>):
# Afrikaans, French (fr4 a woman), Hungarian, Dutch, Polish (a woman) and
# Swedish (sw2 a woman) speakers, the same way as release 3.
MBROLA_VOICES_4 = ["af1", "fr1", "fr4", "hu1", "nl2", "pl1", "sw1", "sw2"]
FIXED_RATE = {"cmu_us_slt_arctic_hts"}  # festival's HTS engine ignores Duration_Stretch
# The Debian packages that give each synthesis command (for the error message).
PACKAGES = {"text2wave": "festival", "RHVoice-test": "rhvoice rhvoice-english",
            "pico2wave": "libttspico-utils"}  # fmt: skip


class SynthesisError(RuntimeError):
    """A synthesizer is missing or failed on a sentence."""


@dataclass(frozen=True)
class Voice:
    engine: str  # "espeak-ng", "flite", "festival", "rhvoice", "pico" or "mbrola"
    name: str  # engine voice (espeak: base+variant)
    rate: float = 1.0  # speaking rate factor
    pitch: int = 50  # 0-99, 50 is the voice's own (espeak-ng, MBROLA, RHVoice, Pico)
    release: int = 1  # the catalogue release that added the voice (see split_voices)

    @property
    def id(self) -> str:
        return f"{self.engine}-{self.name.replace('+', '_')}-r{self.rate:.2f}-p{self.pitch}"

    @property
    def speaker(self) -> str:
        """The voice identity held out as a whole (rate and pitch are not new voices)."""
        return f"{self.engine}-{self.name}"

    def command(self, text: str, out: Path) -> list[str]:
        if self.engine in ("espeak-ng", "mbrola"):  # mbrola: espeak-ng's mb-<db>-en voice
            wpm = str(int(round(165 * self.rate)))
            name = f"mb-{self.name}-en" if self.engine == "mbrola" else self.name
            return ["espeak-ng", "-v", name, "-s", wpm, "-p", str(self.pitch),
                    "-w", str(out), text]  # fmt: skip
        if self.engine == "flite":
            stretch = f"{1.0 / self.rate:.3f}"
            return ["flite", "-voice", self.name, "--setf", f"duration_stretch={stretch}",
                    "-o", str(out), "-t", text]  # fmt: skip
        if self.engine == "festival":
            stretch = f"{1.0 / self.rate:.3f}"
            scheme = f"(voice_{self.name}) (Parameter.set 'Duration_Stretch {stretch})"
            return ["text2wave", "-o", str(out), "-eval", scheme]
        if self.engine == "rhvoice":  # text on stdin; rate and pitch in percent
            return ["RHVoice-test", "-p", self.name, "-r", str(int(round(100 * self.rate))),
                    "-t", str(2 * self.pitch), "-o", str(out)]  # fmt: skip
        if self.engine == "pico":  # rate and pitch as Pico markup, in percent
            markup = (f"<speed level='{int(round(100 * self.rate))}'>"
                      f"<pitch level='{2 * self.pitch}'>{text}</pitch></speed>")  # fmt: skip
            return ["pico2wave", "-l", self.name, "-w", str(out), markup]
        raise SynthesisError(f"unknown engine {self.engine!r}")


def available_engines() -> list[str]:
    """The engines whose programs are all on the PATH."""
    needs = {
        "espeak-ng": ["espeak-ng"],
        "flite": ["flite"],
        "festival": ["text2wave"],
        "rhvoice": ["RHVoice-test"],
        "pico": ["pico2wave"],
        "mbrola": ["mbrola", "espeak-ng"],  # espeak-ng's front end drives the databases
    }
    return [engine for engine, programs in needs.items() if all(map(shutil.which, programs))]


def _festival_voice_installed(name: str) -> bool:
    return any(Path("/usr/share/festival/voices").glob(f"*/{name}"))


def _mbrola_voice_installed(name: str) -> bool:
    return (Path("/usr/share/mbrola") / name / name).is_file()


def catalogue(seed: int = 0, settings_per_voice: int = 3) -> list[Voice]:
    """Every voice of the installed engines, each at a few seeded rate/pitch settings.

    Each release comes after the earlier ones and draws its settings after
    theirs, so installing a later release's engines leaves the earlier
    releases' voices and settings unchanged.
    """
    rng = random.Random(seed)
    engines = available_engines()
    names: list[tuple[str, str, int]] = []
    if "espeak-ng" in engines:
        names += [("espeak-ng", f"{b}+{v}", 1) for b in ESPEAK_BASES for v in ESPEAK_VARIANTS]
    if "flite" in engines:
        names += [("flite", v, 1) for v in FLITE_VOICES]
    if "festival" in engines:
        names += [("festival", v, 1) for v in FESTIVAL_VOICES]
        names += [("festival", v, 2) for v in FESTIVAL_VOICES_2 if _festival_voice_installed(v)]
    if "rhvoice" in engines:
        names += [("rhvoice", v, 2) for v in RHVOICE_VOICES]
    if "pico" in engines:
        names += [("pico", v, 2) for v in PICO_VOICES]
    if "mbrola" in engines:
        names += [("mbrola", v, 3) for v in MBROLA_VOICES if _mbrola_voice_installed(v)]
        names += [("mbrola", v, 4) for v in MBROLA_VOICES_4 if _mbrola_voice_installed(v)]
    voices = []
    for engine, name, release in names:
        for _ in range(settings_per_voice if engine == "espeak-ng" else settings_per_voice * 4):
            rate, pitch = round(rng.uniform(0.8, 1.25), 2), rng.randint(25, 75)
            if name in FIXED_RATE:
                rate = 1.0
            voices.append(Voice(engine, name, rate, pitch, release))
    return voices


def split_voices(
    voices: list[Voice], held_out: float = 0.1, seed: int = 0
) -> tuple[set[str], set[str]]:
    """(training speakers, validation speakers): whole speakers held out, per engine.

    Each (release, engine) group is split on its own, in catalogue order, so a
    later release adds held-out voices without moving an earlier release's.
    """
    rng = random.Random(seed)
    train, valid = set(), set()
    by_group: dict[tuple[int, str], list[str]] = {}
    for v in voices:
        group = by_group.setdefault((v.release, v.engine), [])
        if v.speaker not in group:
            group.append(v.speaker)
    for speakers in by_group.values():
        speakers = sorted(speakers)
        rng.shuffle(speakers)
        k = max(1, round(len(speakers) * held_out)) if len(speakers) > 1 else 0
        valid.update(speakers[:k])
        train.update(speakers[k:])
    return train, valid


def synthesize(voice: Voice, text: str, out: Path, timeout_s: float = 60) -> None:
    """Write ``text`` spoken by ``voice`` to ``out`` (WAV at the engine's rate)."""
    cmd = voice.command(text, out)
    try:
        result = subprocess.run(
            cmd, input=text if voice.engine in ("festival", "rhvoice") else None,
            capture_output=True,
            text=True, timeout=timeout_s,
        )  # fmt: skip
    except FileNotFoundError:
        raise SynthesisError(
            f"{cmd[0]} is not installed (apt-get install {PACKAGES.get(cmd[0], cmd[0])})"
        ) from None
    except subprocess.TimeoutExpired:
        raise SynthesisError(f"{voice.id} timed out on {text[:40]!r}") from None
    if result.returncode != 0 or not out.is_file() or out.stat().st_size < 100:
        raise SynthesisError(f"{voice.id} failed on {text[:40]!r}: {result.stderr.strip()[:200]}")
