"""The procedural world: scenes, their renderer, their captioner and a caption parser.

A scene is one coloured object on a textured grey background. Five discrete attributes
(shape, colour, size, position, background texture) are what captions and zero-shot tasks
talk about; continuous parameters (exact centre, radius, rotation, hue and brightness
jitter, texture phase, background level and contrast, noise seed) make every scene a
different image, so the world has one caption ↔ many images as well as one image ↔ many
captions.

The design is tuned for what a tiny CNN can learn in a few CPU minutes at 32×32 pixels:
saturated object colours a hue step apart against an unsaturated background, silhouettes
that stay distinct at 8 px, sizes with gaps between them, positions on a coarse grid and
background patterns with different spatial frequencies. Captions always name a position
the same way ("in the top left"), so the spatial words are consistent for the text tower.

The renderer is also a perfect text→image generator (:func:`scene_from_caption` then
:func:`render`) and the scene a perfect captioner (:func:`describe`).

Some attribute values have synonyms (:data:`SYNONYMS`: crimson for red, tiny for small,
centre for middle), which pretraining captions use in place of the class name now and then
and the parser reads as that class. Without them every word a text attack could swap into an
attribute's place names another value of it, and a caption that keeps its meaning under
attack would be impossible. Zero-shot prompts and retrieval captions (:func:`describe`)
use the class names only.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import astuple, dataclass
from typing import Sequence

import torch

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "heart"),
    "colour": ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"),
    "size": ("small", "medium", "large"),
    "position": ("top left", "top right", "bottom left", "bottom right", "middle"),
    "texture": ("plain", "striped", "checkered", "dotted", "noisy", "wavy"),
}

#: Zero-shot prompt templates per attribute; pretraining captions use the same wordings.
TEMPLATES: dict[str, list[str]] = {
    "shape": ["a photo of a {c}.", "a {c} shape.", "a picture of a {c} on a background."],
    "colour": ["a photo of a {c} object.", "a {c} shape.", "something coloured {c}."],
    "size": ["a photo of a {c} object.", "a {c} shape.", "an object of {c} size."],
    "position": ["a photo of an object in the {c}.", "a shape in the {c}.",
                 "something in the {c} of the picture."],
    "texture": ["a photo of a {c} background.", "an object on a {c} background.",
                "a shape in front of a {c} pattern."],
}

#: Other words for an attribute value: single words, each used by one value only and by no
#: caption otherwise, so the parser reads any of them as that value.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc",), "diamond": ("rhombus",), "ring": ("hoop",),
    "red": ("crimson", "scarlet"), "orange": ("amber",), "yellow": ("golden",), "green": ("emerald",),
    "cyan": ("turquoise",), "blue": ("azure",), "purple": ("violet",), "pink": ("rose",),
    "small": ("tiny", "little"), "medium": ("midsize",), "large": ("big", "huge"),
    "middle": ("centre", "center"),
    "plain": ("blank",), "striped": ("stripy",), "checkered": ("chequered",), "dotted": ("spotted",),
    "noisy": ("grainy",), "wavy": ("rippled",),
}
#: How often a pretraining caption says an attribute value by one of its synonyms.
SYNONYM_RATE = 0.25
#: The version of what captions say and how (2: synonyms): part of the key of every model
#: trained on them (the world CLIP, the world MLM), so a change retrains them.
CAPTIONS_VERSION = 2

SPLITS = ("train", "test")
#: Share of the scene space that belongs to the test split (by a hash of the parameters).
TEST_FRACTION = 0.2

# Geometry in units of the image side, so any render size shows the same scene.
_POSITION_CENTRES = {
    "top left": (0.28, 0.28), "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72), "middle": (0.5, 0.5),
}
_POSITION_JITTER = 0.04
# Radius ranges with gaps between them, so "size" is never ambiguous.
_SIZE_RADII = {"small": (0.115, 0.135), "medium": (0.175, 0.195), "large": (0.235, 0.255)}
# (hue, saturation, value) in [0, 1]; hue steps are wide so jitter never crosses a class.
_COLOUR_HSV = {
    "red": (0.0, 0.9, 0.9), "orange": (0.075, 0.95, 1.0), "yellow": (0.155, 0.9, 0.95),
    "green": (0.33, 0.85, 0.75), "cyan": (0.5, 0.85, 0.9), "blue": (0.64, 0.85, 0.95),
    "purple": (0.78, 0.7, 0.75), "pink": (0.92, 0.45, 1.0),
}
_HUE_JITTER = 0.015


@dataclass(frozen=True)
class Scene:
    """One object on one background: five attributes and the continuous details."""

    shape: str
    colour: str
    size: str
    position: str
    texture: str
    cx: float           # object centre, fraction of the image width
    cy: float           # object centre, fraction of the image height (0 = top)
    radius: float       # fraction of the image side
    rotation: float     # radians, small: a square stays a square
    hue_shift: float    # added to the colour's hue
    brightness: float   # multiplies the colour's value
    phase_x: float      # texture phase, fraction of its period
    phase_y: float
    background: float   # mean grey level of the background
    contrast: float     # amplitude of the background pattern
    noise_seed: int     # the pixel noise of the "noisy" texture

    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def key(self) -> str:
        """A stable identity of the scene (all parameters, rounded as stored)."""
        return hashlib.sha256(repr(astuple(self)).encode()).hexdigest()


def split_of(scene: Scene) -> str:
    """The split a scene belongs to: a function of the scene itself, so splits never overlap."""
    bucket = int(scene.key()[:8], 16) / 16 ** 8
    return "test" if bucket < TEST_FRACTION else "train"


def _random_scene(rng: random.Random) -> Scene:
    attrs = {name: rng.choice(values) for name, values in ATTRIBUTES.items()}
    cx, cy = _POSITION_CENTRES[attrs["position"]]
    low, high = _SIZE_RADII[attrs["size"]]
    # Rounding keeps scene keys short and reproducible from their printed form.
    return Scene(
        **attrs,
        cx=round(cx + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER), 4),
        cy=round(cy + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER), 4),
        radius=round(rng.uniform(low, high), 4),
        rotation=round(rng.uniform(-0.2, 0.2), 4),
        hue_shift=round(rng.uniform(-_HUE_JITTER, _HUE_JITTER), 4),
        brightness=round(rng.uniform(0.85, 1.0), 4),
        phase_x=round(rng.random(), 4),
        phase_y=round(rng.random(), 4),
        background=round(rng.uniform(0.35, 0.6), 4),
        contrast=round(rng.uniform(0.12, 0.2), 4),
        noise_seed=rng.randrange(2 ** 31),
    )


def sample_scenes(split: str, n: int, seed: int = 0, *, unique_attributes: bool = False) -> list[Scene]:
    """``n`` scenes of ``split``, deterministic in ``(split, n, seed)``.

    Candidates are drawn from one seeded stream and kept if :func:`split_of` assigns them to
    ``split``. With ``unique_attributes`` no two scenes share all five attribute values
    (a retrieval gallery whose captions identify exactly one image).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown world split {split!r}; use one of {SPLITS}")
    combinations = math.prod(len(v) for v in ATTRIBUTES.values())
    if unique_attributes and n > combinations:
        raise ValueError(f"only {combinations} attribute combinations exist, asked for {n} unique")
    rng = random.Random(f"vlbench-world:{split}:{seed}")
    scenes: list[Scene] = []
    taken: set[tuple[str, ...]] = set()
    while len(scenes) < n:
        scene = _random_scene(rng)
        if split_of(scene) != split:
            continue
        if unique_attributes:
            combo = tuple(scene.attributes().values())
            if combo in taken:
                continue
            taken.add(combo)
        scenes.append(scene)
    return scenes


# -- rendering -------------------------------------------------------------------------------
def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[N] hue, saturation, value → [N, 3] RGB."""
    k = torch.stack([torch.full_like(h, 5.0), torch.full_like(h, 3.0), torch.full_like(h, 1.0)], -1)
    k = (k + h[:, None] * 6) % 6
    weight = torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[:, None] - v[:, None] * s[:, None] * weight


def _shape_distance(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (in radii, negative inside) of a unit-radius shape at (u, v)."""
    rho = torch.sqrt(u * u + v * v)
    if shape == "circle":
        return rho - 0.95
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.82
    if shape == "diamond":
        return (u.abs() + v.abs() - 1.1) * 0.7071
    if shape == "triangle":  # apex up; image y grows downwards
        base = v - 0.7
        side = (1.6 * u.abs() - v - 1.0) / math.hypot(1.6, 1.0)
        return torch.maximum(base, side)
    if shape == "cross":
        bar = 0.33
        horizontal = torch.maximum(u.abs() - 1.0, v.abs() - bar)
        vertical = torch.maximum(u.abs() - bar, v.abs() - 1.0)
        return torch.minimum(horizontal, vertical)
    if shape == "ring":
        return (rho - 0.7).abs() - 0.3
    if shape == "star":  # five points, tip up
        angle = torch.atan2(u, -v)
        sector = 2 * math.pi / 5
        folded = (angle % sector) / sector  # 0 at a tip, 0.5 between tips
        reach = 1.05 - 0.62 * (1 - (2 * folded - 1).abs())
        return (rho - reach) * 0.6
    if shape == "heart":
        # two lobes over a downward point
        lobes = torch.minimum(torch.sqrt((u + 0.42) ** 2 + (v + 0.3) ** 2),
                              torch.sqrt((u - 0.42) ** 2 + (v + 0.3) ** 2)) - 0.5
        point = torch.maximum((1.05 * u.abs() + v - 0.75) / math.hypot(1.05, 1.0), -v - 0.3)
        return torch.minimum(lobes, point)
    raise ValueError(f"unknown shape {shape!r}")


def _hash_noise(ix: torch.Tensor, iy: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Deterministic pixel noise in [-1, 1] from integer coordinates and a seed (no RNG state)."""
    h = (ix * 374761393 + iy * 668265263 + seed * 2246822519) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h & 0xFFFF).float() / 32767.5 - 1.0


def _texture(texture: str, x: torch.Tensor, y: torch.Tensor, px: torch.Tensor, py: torch.Tensor,
             seed: torch.Tensor, size: int) -> torch.Tensor:
    """Background pattern in [-1, 1]; x, y are [N, S, S] in image-side units."""
    two_pi = 2 * math.pi
    if texture == "plain":
        return torch.zeros_like(x)
    if texture == "striped":  # vertical bars, period 1/8 of the image
        return torch.tanh(3 * torch.sin(two_pi * (8 * x + px)))
    if texture == "checkered":  # squares of 1/8 of the image
        return torch.tanh(3 * torch.sin(two_pi * (4 * x + px)) * torch.sin(two_pi * (4 * y + py)) * 2)
    if texture == "dotted":
        fx = (5 * x + px) % 1 - 0.5
        fy = (5 * y + py) % 1 - 0.5
        return torch.clamp(1.5 - torch.sqrt(fx * fx + fy * fy) * 10, -1, 1)
    if texture == "noisy":
        ix = (x * size).long()
        iy = (y * size).long()
        return _hash_noise(ix, iy, seed)
    if texture == "wavy":  # diagonal bands that bend
        return torch.sin(two_pi * (3 * (x + y) + 0.35 * torch.sin(two_pi * (2 * (x - y) + py)) + px))
    raise ValueError(f"unknown texture {texture!r}")


def _render_chunk(scenes: Sequence[Scene], size: int) -> torch.Tensor:
    n = len(scenes)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y = coords.view(1, size, 1).expand(n, size, size)
    x = coords.view(1, 1, size).expand(n, size, size)

    def column(name: str, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor([getattr(s, name) for s in scenes], dtype=dtype).view(n, 1, 1)

    # background: grey level plus the scene's pattern
    pattern = torch.zeros(n, size, size)
    px, py = column("phase_x"), column("phase_y")
    seeds = column("noise_seed", torch.int64)
    for texture in ATTRIBUTES["texture"]:
        rows = torch.tensor([i for i, s in enumerate(scenes) if s.texture == texture], dtype=torch.long)
        if len(rows):
            pattern[rows] = _texture(texture, x[rows], y[rows], px[rows], py[rows], seeds[rows], size)
    grey = column("background") + column("contrast") * pattern
    image = grey.unsqueeze(1).expand(n, 3, size, size).clone()

    # object: signed distance in radii → anti-aliased coverage over about one pixel
    radius = column("radius")
    dx, dy = (x - column("cx")) / radius, (y - column("cy")) / radius
    cos, sin = torch.cos(column("rotation")), torch.sin(column("rotation"))
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    distance = torch.zeros(n, size, size)
    for shape in ATTRIBUTES["shape"]:
        rows = torch.tensor([i for i, s in enumerate(scenes) if s.shape == shape], dtype=torch.long)
        if len(rows):
            distance[rows] = _shape_distance(shape, u[rows], v[rows])
    coverage = torch.clamp(0.5 - distance * radius * size, 0, 1).unsqueeze(1)

    hsv = torch.tensor([_COLOUR_HSV[s.colour] for s in scenes])
    hue = (hsv[:, 0] + torch.tensor([s.hue_shift for s in scenes])) % 1.0
    value = hsv[:, 2] * torch.tensor([s.brightness for s in scenes])
    rgb = _hsv_to_rgb(hue, hsv[:, 1], value).view(n, 3, 1, 1)
    image = image * (1 - coverage) + rgb * coverage
    return image.clamp_(0, 1)


def render(scenes: Sequence[Scene], size: int = 32, chunk: int = 2048) -> torch.Tensor:
    """Float images [N, 3, size, size] in [0, 1]; each image depends only on its scene."""
    if not scenes:
        return torch.empty(0, 3, size, size)
    parts = [_render_chunk(scenes[start:start + chunk], size) for start in range(0, len(scenes), chunk)]
    return torch.cat(parts)


# -- captions -----------------------------------------------------------------------------------
# Full descriptions: every attribute by its class name, in different orders and sentence forms.
_DESCRIPTIONS = [
    "a {size} {colour} {shape} in the {position} on a {texture} background.",
    "a {texture} background with a {size} {colour} {shape} in the {position}.",
    "in the {position} there is a {size} {colour} {shape} over a {texture} backdrop.",
    "a {colour} {shape} of {size} size sits in the {position} of a {texture} background.",
    "on a {texture} background, a {size} {shape} coloured {colour} in the {position}.",
    "a photo of a {size} {colour} {shape} in the {position} against a {texture} pattern.",
    "the {position} holds one {colour} {shape}, {size}, on a {texture} backdrop.",
]


def describe(scene: Scene, n: int = 5) -> list[str]:
    """``n`` differently worded captions, each naming all five attributes of ``scene``."""
    if not 1 <= n <= len(_DESCRIPTIONS):
        raise ValueError(f"describe gives 1 to {len(_DESCRIPTIONS)} captions, asked for {n}")
    attrs = scene.attributes()
    return [template.format(**attrs) for template in _DESCRIPTIONS[:n]]


def _partial_caption(attrs: dict[str, str], rng: random.Random) -> str:
    """A caption naming only the attributes in ``attrs`` (at least one)."""
    noun = attrs.get("shape") or rng.choice(("object", "shape", "thing"))
    adjectives = " ".join(attrs[k] for k in ("size", "colour") if k in attrs)
    phrase = f"{adjectives} {noun}".strip()
    article = "an" if phrase[0] in "aeiou" else "a"
    text = f"{rng.choice(('a photo of ', '', 'a picture of '))}{article} {phrase}"
    if "position" in attrs:
        text += f" in the {attrs['position']}"
    if "texture" in attrs:
        text += f" on a {attrs['texture']} background"
    return text + "."


def generated_captions(scene: Scene, n: int, rng: random.Random, ground_truth: int) -> list[str]:
    """``n`` captions as an image captioner would write them: in a wording the first
    ``ground_truth`` descriptions (a retrieval split's captions) do not use, or naming only
    three or four of the five attributes, the way a captioner leaves out some details.
    Every attribute a caption names is the scene's."""
    attrs = scene.attributes()
    fresh = _DESCRIPTIONS[ground_truth:]
    captions = []
    for _ in range(n):
        if fresh and rng.random() < 0.5:
            captions.append(rng.choice(fresh).format(**attrs))
        else:
            names = rng.sample(tuple(ATTRIBUTES), rng.randint(3, 4))
            captions.append(_partial_caption({k: attrs[k] for k in names}, rng))
    return captions


#: Mix of pretraining captions: full descriptions, one attribute (a zero-shot prompt), or a subset.
CAPTION_MIX = {"full": 0.4, "single": 0.3, "subset": 0.3}
#: Which attribute a single-attribute caption names. Shape is the one a small CNN learns
#: last (colour, texture, size and position have cheap pixel statistics), so it is named
#: most often; otherwise its features are starved by the easy attributes.
SINGLE_WEIGHTS = {"shape": 1.0, "colour": 1.0, "size": 1.0, "position": 1.0, "texture": 1.0}


def _worded(attrs: dict[str, str], rng: random.Random, rate: float) -> dict[str, str]:
    """``attrs`` with each value said by one of its :data:`SYNONYMS` at ``rate``."""
    return {name: rng.choice(SYNONYMS[value]) if value in SYNONYMS and rng.random() < rate else value
            for name, value in attrs.items()}


def random_caption(scene: Scene, rng: random.Random, synonym_rate: float = SYNONYM_RATE) -> str:
    """One caption for pretraining: a full description, one zero-shot prompt, or a subset,
    its attribute values now and then (at ``synonym_rate``) said by a synonym.

    The mix keeps zero-shot prompts in distribution (single-attribute captions use the
    :data:`TEMPLATES` wordings) and teaches full descriptions for retrieval.
    """
    attrs = _worded(scene.attributes(), rng, synonym_rate)
    draw = rng.random()
    if draw < CAPTION_MIX["full"]:
        return rng.choice(_DESCRIPTIONS).format(**attrs)
    if draw < CAPTION_MIX["full"] + CAPTION_MIX["single"]:
        name = rng.choices(tuple(SINGLE_WEIGHTS), weights=tuple(SINGLE_WEIGHTS.values()))[0]
        return rng.choice(TEMPLATES[name]).format(c=attrs[name])
    names = rng.sample(tuple(ATTRIBUTES), rng.randint(2, 4))
    return _partial_caption({k: attrs[k] for k in names}, rng)


_CLASS_PATTERNS = {
    name: [(value, re.compile(r"\b(?:" + "|".join(map(re.escape, (value, *SYNONYMS.get(value, ())))) + r")\b"))
           for value in values]
    for name, values in ATTRIBUTES.items()
}


def scene_from_caption(text: str) -> dict[str, str]:
    """The attribute values a caption names (attribute → class, a synonym read as its
    class); unmentioned ones are absent, and so are those it names two values of."""
    lowered = " ".join(text.lower().split())
    found = {}
    for name, patterns in _CLASS_PATTERNS.items():
        hits = [value for value, pattern in patterns if pattern.search(lowered)]
        if len(hits) == 1:
            found[name] = hits[0]
    return found


def scene_for(attributes: dict[str, str], rng: random.Random) -> Scene:
    """A random scene with the given attribute values (the text→image generator's sampler)."""
    unknown = {k: v for k, v in attributes.items() if k not in ATTRIBUTES or v not in ATTRIBUTES[k]}
    if unknown:
        raise ValueError(f"unknown attribute values {unknown}")
    base = _random_scene(rng)
    fields = {**base.__dict__, **attributes}
    cx, cy = _POSITION_CENTRES[fields["position"]]
    low, high = _SIZE_RADII[fields["size"]]
    fields.update(cx=round(cx + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER), 4),
                  cy=round(cy + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER), 4),
                  radius=round(rng.uniform(low, high), 4))
    return Scene(**fields)
