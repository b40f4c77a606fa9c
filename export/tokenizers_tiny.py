"""Tokenizer files: the tiny checkpoint's trained tokenizers, and the conversion of any
checkpoint's tokenizers into the single ``tokenizer.json`` the runtime reads.

The tiny CLIP tokenizer is a byte-level BPE with CLIP's normalization, pre-tokenization and
``</w>`` word ends (transformers' ``CLIPConverter`` pipeline); the tiny T5 tokenizer a Unigram
model with ``<pad>``=0, ``</s>``=1, ``<unk>``=2 and a Metaspace pre-tokenizer.  Both are learnt
from a built-in corpus, through the ``tokenizers`` library's normalizers and pre-tokenizers but
with small deterministic loops in place of its trainers (whose results vary from run to run), and
saved through transformers in the files real FLUX folders carry: ``tokenizer/`` vocab.json +
merges.txt + tokenizer_config.json + special_tokens_map.json; ``tokenizer_2/`` tokenizer.json +
the same two configs (no spiece.model: the Unigram model is not a sentencepiece one).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from pathlib import Path

from fluxrt.errors import CheckpointError

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
VOCAB_SIZE = 1000
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5's sentencepiece model

CORPUS = """\
A red fox sleeping in the snow under a pale winter sun.
An astronaut riding a horse across the surface of the moon.
A lighthouse on a rocky cliff at dawn, waves crashing below.
Portrait of an old fisherman with a grey beard, 35mm film photo.
A glass teapot filled with blooming jasmine flowers on a wooden table.
Two cats curled up together on a windowsill while rain falls outside.
A quiet mountain village at night, warm lights glowing in every window.
A vintage car parked in front of a diner in the 1950s.
A robot chef flipping pancakes in a busy restaurant kitchen.
A field of sunflowers stretching to the horizon under a blue sky.
A paper boat floating down a gutter after a summer storm.
A koi pond with lily pads and orange fish, seen from above.
A steam locomotive crossing a stone bridge through thick fog.
A cozy wooden cabin in the forest with smoke rising from the chimney.
A jellyfish glowing in the deep ocean, bioluminescent and translucent.
A violin resting on sheet music beside an open window.
The quick brown fox jumps over the lazy dog.
She sells seashells by the seashore every Saturday morning.
Watercolor painting of a Venetian canal with gondolas and old bridges.
Isometric 3D render of a tiny island with a castle and a waterfall.
Ukiyo-e woodblock print of a great wave and Mount Fuji in the distance.
Cinematic wide-angle shot of a desert highway at sunset, dramatic clouds.
A pencil sketch of a hummingbird hovering near a trumpet flower.
Macro photograph of a dewdrop on a spider web, shallow depth of field.
An abandoned greenhouse overgrown with ferns and climbing vines.
A bustling street market in Marrakech with spices and lanterns.
A medieval knight in shining armor standing in a misty forest.
A child flying a kite on a windy beach, golden hour lighting.
A cup of coffee with latte art shaped like a heart, top view.
A futuristic city skyline with flying cars and neon billboards.
An owl perched on a branch, its eyes reflecting the full moon.
A bowl of ramen with a soft-boiled egg, chopsticks and steam.
A snowy owl gliding silently over a frozen lake.
The northern lights dancing above a small red cabin in Norway.
A library with towering bookshelves and a rolling wooden ladder.
An elephant family walking through the savanna at dusk.
A hot air balloon drifting over the vineyards of Tuscany.
A samurai meditating beneath a cherry blossom tree in full bloom.
Don't forget: it's 12:30 on Friday, and we'll meet at 7 pm.
I'm sure they've already left, but you're welcome to wait.
He'd said the price was $49.99, plus 8% tax.
Oil painting of a stormy sea with a tall ship fighting the waves.
A minimalist poster with bold geometric shapes in primary colors.
A golden retriever puppy playing in autumn leaves.
A crystal clear mountain stream flowing over smooth pebbles.
A chess board in the middle of a game, dramatic side lighting.
Photorealistic render of a sports car on a wet racetrack at night.
A tiny mouse reading a book by candlelight in a hollow log.
Studio portrait of a woman with freckles and curly red hair, 85mm lens.
A dragon curled around the tower of a ruined castle.
An underwater coral reef teeming with colorful tropical fish.
A bicycle leaning against a yellow wall covered in ivy.
Graffiti art on a brick wall in a narrow alley in Berlin.
A plate of fresh sushi arranged on a black slate board.
A snow-covered pine forest seen from a helicopter.
Steampunk airship with brass gears and billowing sails.
A sleepy village street in Provence with lavender in pots.
A thunderstorm over the Great Plains, lightning striking the ground.
A stack of pancakes with blueberries and maple syrup.
Close-up of a tiger's face, intense green eyes, highly detailed.
Children building a sandcastle while seagulls circle overhead.
A lonely astronaut sitting on a bench on Mars, looking at Earth.
A Victorian greenhouse filled with orchids and exotic palms.
An antique map of the world with compass roses and sea monsters.
A bonsai tree on a wooden stand, soft studio light, white background.
Low-poly illustration of a fox in a forest clearing.
Pixel art of a knight fighting a slime monster in a dungeon.
A group of friends laughing around a campfire under the stars.
A misty morning in a bamboo forest, rays of light through the stalks.
Charcoal drawing of an old man's hands holding a pocket watch.
A cat wearing a tiny wizard hat, casting a spell with a wand.
A surfer riding a giant wave at Nazaré, spray in the air.
A quiet reading nook with a blanket, tea and a stack of novels.
Fireworks exploding over a harbor on New Year's Eve.
A baker pulling fresh bread out of a stone oven.
Art deco poster of a train speeding through the mountains.
A polar bear standing on an ice floe under a pink sky.
A neon sign that says OPEN glowing in a rainy window.
Architectural photo of a concrete brutalist building, overcast sky.
A field of tulips in the Netherlands with a windmill behind.
A squirrel holding an acorn, sitting on a moss-covered stump.
An intricate mandala drawn in white ink on black paper.
A busy train station in Tokyo during the evening rush hour.
A sailboat on a calm lake reflecting the autumn trees.
Impressionist painting of a garden with a small footbridge and water lilies.
A close-up of hands kneading dough on a floured table.
The ruins of an ancient temple in the jungle, covered in roots.
A man in a yellow raincoat walking a dog along the pier.
Vector illustration of a rocket launching into space, flat colors.
A bowl of fruit with apples, pears and grapes, still life.
Silhouette of a lone tree on a hill against a purple sunset.
A raccoon rummaging through a trash can at midnight.
A classic motorcycle on an empty desert road, heat haze.
Rain drops on a car window with blurred city lights behind.
A butterfly with iridescent blue wings resting on a leaf.
An ice cream cone melting in the summer heat, pastel colors.
A wolf howling on a snowy ridge beneath the aurora.
A cluttered artist's studio with canvases, brushes and paint tubes.
Three hot air balloons rising above the fairy chimneys of Cappadocia.
A fountain pen writing elegant calligraphy on parchment.
Numbers and symbols: 0 1 2 3 4 5 6 7 8 9 ! ? . , ; : ' " ( ) [ ] { } - _ / & % # @ * + = < >
"""


def corpus(seed: int) -> list[str]:
    """The built-in sentences, in an order that depends on ``seed`` only."""
    lines = CORPUS.splitlines()
    random.Random(seed).shuffle(lines)
    return lines


def clip_words(lines: list[str]) -> Counter[str]:
    """Word counts after CLIP's normalization and pre-tokenization (transformers' ``CLIPConverter``):
    NFC, whitespace runs to one space, lower case, CLIP's split regex, byte-level symbols."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                       normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    return Counter(w for line in lines for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    for s in symbols:
        if out and (out[-1], s) == pair:
            out[-1] += s
        else:
            out.append(s)
    return out


def train_bpe(words: Counter[str], n_merges: int) -> list[tuple[str, str]]:
    """The ``n_merges`` most frequent symbol pairs, merged greedily as BPE training does.

    A plain loop rather than tokenizers' ``BpeTrainer``, whose tie-breaking follows hash-map order
    and so changes from run to run; here ties go to the pair seen first in the corpus.
    """
    splits = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        counts: Counter[tuple[str, str]] = Counter()
        for w, n in words.items():
            for pair in zip(splits[w], splits[w][1:]):
                counts[pair] += n
        assert counts, f"the built-in corpus gives {len(merges)} BPE merges, {n_merges} are needed"
        best = max(counts, key=counts.__getitem__)
        merges.append(best)
        splits = {w: merge_pair(s, best) if best[0] in s else s for w, s in splits.items()}
    return merges


def train_clip(seed: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style vocabulary of ``VOCAB_SIZE`` tokens laid out as CLIP's 49408 are: every byte
    symbol, every byte symbol at a word's end, the merged tokens, then the two special tokens."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    base = alphabet + [c + "</w>" for c in alphabet]
    merges = train_bpe(clip_words(corpus(seed)), VOCAB_SIZE - len(base) - len(CLIP_SPECIALS))
    tokens = base + ["".join(m) for m in merges] + list(CLIP_SPECIALS)
    assert len(set(tokens)) == VOCAB_SIZE, "BPE merges produced a token twice"
    return {t: i for i, t in enumerate(tokens)}, merges


def train_unigram(lines: list[str], size: int, max_piece: int = 12) -> list[tuple[str, float]]:
    """Unigram pieces with log-frequency scores: every character, then the substrings of the
    Metaspace-split words that occur at least twice, most covering (count x length) first.

    One deterministic pass instead of tokenizers' ``UnigramTrainer``, whose EM scores vary in their
    last digits from run to run.
    """
    from tokenizers import pre_tokenizers

    # transformers' T5Tokenizer pre-tokenization: split on whitespace, "▁" before each word
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                             pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    counts: Counter[str] = Counter()
    for line in lines:
        for word, _ in pre_tokenizer.pre_tokenize_str(line):
            counts.update(word[i:j] for i in range(len(word)) for j in range(i + 1, min(len(word), i + max_piece) + 1))
    chars = sorted(p for p in counts if len(p) == 1)
    longer = sorted((p for p, n in counts.items() if len(p) > 1 and n > 1), key=lambda p: (-counts[p] * len(p), p))
    pieces = chars + longer[:size - len(T5_SPECIALS) - len(chars)]
    total = sum(counts[p] for p in pieces)
    scored = sorted(((p, math.log(counts[p] / total)) for p in pieces), key=lambda ps: (-ps[1], ps[0]))
    return [(t, 0.0) for t in T5_SPECIALS] + scored


def train_t5(seed: int) -> list[tuple[str, float]]:
    """T5's layout: ``<pad>``, ``</s>``, ``<unk>`` (ids 0, 1, 2), then pieces by decreasing score."""
    return train_unigram(corpus(seed + 1), VOCAB_SIZE)


def write_special_tokens_map(tokenizer, out_dir: Path) -> None:
    """transformers 5 no longer writes this file; FLUX folders have it and older versions read it."""
    (Path(out_dir) / "special_tokens_map.json").write_text(json.dumps(tokenizer.special_tokens_map, indent=2) + "\n")


def write_tiny_tokenizers(clip_dir: Path, t5_dir: Path, seed: int = 0) -> None:
    """Train the tiny CLIP and T5 tokenizers and save them in FLUX's ``tokenizer/`` and ``tokenizer_2/`` layout."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    vocab, merges = train_clip(seed)
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)
    clip.save_pretrained(clip_dir)
    # transformers 5 saves tokenizer.json; FLUX's tokenizer/ holds the BPE files CLIPTokenizer reads
    clip.backend_tokenizer.model.save(str(clip_dir))
    (Path(clip_dir) / "tokenizer.json").unlink()
    write_special_tokens_map(clip, clip_dir)
    t5 = T5TokenizerFast(vocab=train_t5(seed), extra_ids=0, model_max_length=T5_MAX_LENGTH)
    t5.save_pretrained(t5_dir)
    write_special_tokens_map(t5, t5_dir)


def load_checkpoint_tokenizer(src_dir: Path, kind: str):
    """The tokenizer diffusers' FluxPipeline would load from this folder (model_index.json names
    ``CLIPTokenizer`` and ``T5TokenizerFast``)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    classes = {"clip": CLIPTokenizer, "t5": T5TokenizerFast}
    if kind not in classes:
        raise ValueError(f"tokenizer kind {kind!r} is not one of {list(classes)}")
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise CheckpointError(f"{kind} tokenizer folder {src_dir} is missing")
    try:
        return classes[kind].from_pretrained(str(src_dir), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError, JSON and tokenizers errors
        files = sorted(p.name for p in src_dir.iterdir())
        raise CheckpointError(f"{kind} tokenizer in {src_dir} could not be loaded (files: {files}): {e}") from None


TOKENIZER_FILES = {"clip": (("tokenizer.json",), ("vocab.json", "merges.txt")),
                   "t5": (("tokenizer.json",), ("spiece.model",))}
EMBEDDING_PADDING = 128  # rows a text encoder may have beyond its tokenizer's vocabulary (T5: 32128 for 32100)


def check_checkpoint_tokenizer(src_dir: Path, kind: str, vocab_size: int) -> None:
    """A checkpoint's tokenizer checked like its weights: its files present, loadable, and its vocabulary the
    text encoder's (every id it makes has an embedding row; at most a few rows of padding beyond)."""
    src_dir = Path(src_dir)
    options = TOKENIZER_FILES[kind]
    if not src_dir.is_dir() or not any(all((src_dir / f).is_file() for f in files) for files in options):
        found = sorted(p.name for p in src_dir.iterdir()) if src_dir.is_dir() else "no folder"
        raise CheckpointError(f"{kind} tokenizer {src_dir} needs {' or '.join(' + '.join(f) for f in options)}; "
                              f"found {found}")
    size = len(load_checkpoint_tokenizer(src_dir, kind))
    if not vocab_size - EMBEDDING_PADDING <= size <= vocab_size:
        raise CheckpointError(f"{kind} tokenizer {src_dir} has {size} tokens, but its text encoder embeds "
                              f"{vocab_size}: not this model's tokenizer")


def write_runtime_tokenizer(src_dir: Path, dst_file: Path, kind: str) -> None:
    """Write the ``tokenizers`` JSON of the checkpoint's tokenizer to ``dst_file``, atomically.

    Works for the tiny folders and for real FLUX ones (CLIP: vocab.json + merges.txt; T5:
    spiece.model and/or tokenizer.json): transformers builds the backend tokenizer either way.
    """
    from fluxrt.components import PAD_TOKENS

    tokenizer = load_checkpoint_tokenizer(src_dir, kind)
    if str(tokenizer.pad_token) != PAD_TOKENS[kind]:
        raise CheckpointError(f"{kind} tokenizer in {src_dir} pads with {str(tokenizer.pad_token)!r}; the runtime "
                              f"pads {kind} prompts with {PAD_TOKENS[kind]!r}, as FLUX's tokenizers do")
    dst_file = Path(dst_file)
    tmp = dst_file.with_name(f".{dst_file.name}.tmp-{os.getpid()}")
    try:
        tokenizer.backend_tokenizer.save(str(tmp))
        os.replace(tmp, dst_file)
    finally:
        tmp.unlink(missing_ok=True)
