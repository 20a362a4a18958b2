"""The tiny models' tokenizer: a vocabulary trained in memory with every family's placeholders as special tokens,
and the chat template they all share (no network, so tests and the lab run offline)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
IMAGE_TOKEN, AUDIO_TOKEN = "<image>", "<audio>"
# Placeholders the processors of the families look up by name; all are single special tokens.
FAMILY_TOKENS = (
    IMAGE_TOKEN,
    AUDIO_TOKEN,
    "<fake_token_around_image>",  # idefics3
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
    "<|vision_start|>",  # qwen2_vl
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_end|>",
    "<|AUDIO|>",  # qwen2_audio
    "<|audio_bos|>",
    "<|audio_eos|>",
)
# <unk> first, so no id that code tests for truth (`pad_token_id or eos_token_id` in TRL) is 0.
SPECIAL_TOKENS: tuple[str, ...] = (UNK, PAD, BOS, EOS, *ROLE_TOKENS, *FAMILY_TOKENS)

# Words of the built-in bias lab and of the tests: colours, objects, counts, question words.
DEFAULT_WORDS: tuple[str, ...] = tuple(
    """
    red orange yellow green blue purple pink brown black white gray grey
    banana apple lemon tomato carrot leaf sky grass snow bear polar cat cats dog dogs car cars bird
    fish frog ball box circle square triangle star shape object objects
    zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10
    yes no a an the of in on is are what which how many there this that it its color colour image
    picture photo describe answer with word question sound audio hear do you see please
    . , ? ! : ' -
    """.split()
)


def chat_template(image_placeholder: str = IMAGE_TOKEN, audio_placeholder: str = AUDIO_TOKEN) -> str:
    """A jinja chat template for TRL-style messages (content: a str or a list of typed parts).

    Renders ``<bos>`` once, then per turn ``<|role|>`` + content + ``<eos>``; with
    ``add_generation_prompt`` it ends with ``<|assistant|>``. Every structural piece is a special
    token, so the rendered prompt tokenizes to an exact prefix of prompt + answer, and the answer
    alone (what TRL cuts off after the prompt) tokenizes to the answer's tokens + ``<eos>``.
    """
    part = (
        "{%- if part['type'] == 'image' -%}"
        + image_placeholder
        + "{%- elif part['type'] == 'audio' -%}"
        + audio_placeholder
        + "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    )
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{{- '<|' + message['role'] + '|>' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}" + part + "{%- endfor -%}{%- endif -%}"
        "{{- eos_token -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
    )


def build_tokenizer(
    words: Iterable[str] = (), *, corpus: Iterable[str] = (), kind: str = "word"
) -> PreTrainedTokenizerFast:
    """Train a small tokenizer in memory, with every family's placeholders as special tokens.

    Args:
        words: ``kind="word"``: words that become single tokens, lower-cased; ``kind="bpe"``:
            more training text.
        corpus: texts. ``kind="word"`` adds every word of them (split on whitespace and on each
            punctuation character, lower-cased); ``kind="bpe"`` trains the merges on them.
        kind: ``"word"``: a WordLevel vocabulary, lower-casing its input, unknown words -> ``<unk>``,
            decoded space-joined ("two cats"; punctuation attached: "yes."). ``"bpe"``: byte-level
            BPE (256 bytes, the special tokens and the corpus' merges, at most 1000 tokens), case
            kept, nothing unknown.

    Returns:
        A fast tokenizer with ``<pad>``, ``<unk>``, ``<bos>``, ``<eos>``, the role tokens, the
        placeholders of ``SPECIAL_TOKENS`` and the chat template of :func:`chat_template`; it pads
        on the left. No special token is added on ``encode``: the chat template writes ``<bos>``.
    """
    corpus = list(corpus)
    if kind == "word":
        pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
        vocab_words = {w.lower() for w in words}
        for text in corpus:
            vocab_words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        for word in sorted(vocab_words - set(vocab)):
            vocab[word] = len(vocab)
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre
        # The WordPiece decoder joins with spaces and glues punctuation back ("yes ." -> "yes.").
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=1000,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator([*corpus, *words], trainer=trainer)
    else:
        raise ValueError(f"kind={kind!r}: expected 'word' or 'bpe'")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, UNK, BOS, EOS)],
        model_input_names=["input_ids", "attention_mask"],
        chat_template=chat_template(),
        padding_side="left",
    )
