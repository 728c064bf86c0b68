"""Build the tiny offline tokenizer shipped in omnigen2_batch/model/assets/tiny_tokenizer/.

A Qwen2-style byte-level BPE (600 learned tokens + the 14 Qwen special tokens, ids 600-613)
trained with `tokenizers` on the small English/Chinese corpus below, wrapped as a transformers
Qwen2 tokenizer with the Qwen2.5-VL chat template. It lets the tiny model run the real
text-encoding path (chat template, padding, masks) with no download. Offline and deterministic:

    python scripts/build_tiny_tokenizer.py [--out DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parents[1] / "omnigen2_batch" / "model" / "assets" / "tiny_tokenizer"
VOCAB_SIZE = 600  # learned tokens; the special tokens come after them

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation, spaces.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The Qwen2.5-VL chat template (the one the released processor ships).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = """
system user assistant: the system, the user and the assistant take turns in a chat.
You are a helpful assistant that generates high-quality images based on user instructions.
You are a helpful assistant.
A photo of a red fox sitting in the snow at sunrise.
A portrait of a young woman with short black hair, soft studio light, looking at the camera.
A cat sleeping on a wooden table next to a cup of coffee.
A dog running in the park on a sunny afternoon, green grass, blue sky.
Change the color of the car to blue. Remove the person in the background.
Replace the sky with a dramatic sunset. Make the image look like a watercolor painting.
The woman from the first image holds the bag from the second image.
The man from image 1 is standing in front of the house in image 2.
Add a small boat on the lake. Turn the photo into a pencil sketch. Make it night time.
A futuristic city skyline at night with neon lights and flying cars, cinematic, 4k.
An oil painting of mountains and a river, warm colors, impressionist style.
A close-up of a bowl of ramen with an egg, steam rising, food photography.
A watercolor illustration of a lighthouse on a rocky coast under a cloudy sky.
A cute robot reading a book in a library, digital art, highly detailed.
A medieval knight riding a white horse through a forest, dramatic lighting.
A children's book illustration of a bear having a picnic with a rabbit.
Product photo of a leather bag on a white background, sharp focus, high resolution.
Blurry, ugly, low quality, distorted, deformed hands, bad anatomy, watermark, text.
The character smiles and waves; she wears a yellow raincoat and red boots.
What in the image does not match the prompt? Answer in one short sentence.
Describe the image. The colors, the lighting, the composition and the style.
0 1 2 3 4 5 6 7 8 9 10 20 50 100 512 1024 2048
一只红色的狐狸坐在雪地里，日出时分。
一位留着黑色短发的年轻女子的肖像，柔和的灯光，看着镜头。
一只猫睡在木桌上，旁边有一杯咖啡。
一只狗在公园里奔跑，阳光明媚的下午，绿色的草地，蓝色的天空。
把汽车的颜色改成蓝色。删除背景中的人。
把天空换成壮观的日落。让图片看起来像水彩画。
第一张图片中的女人拿着第二张图片中的包。
夜晚的未来城市天际线，霓虹灯和飞行汽车，电影感。
山川和河流的油画，温暖的色彩，印象派风格。
一碗拉面的特写，上面有一个鸡蛋，热气腾腾，美食摄影。
岩石海岸上的灯塔，多云的天空，水彩插画。
一个可爱的机器人在图书馆里看书，数字艺术，细节丰富。
模糊，丑陋，低质量，变形，水印，文字。
一个穿着黄色雨衣和红色靴子的女孩在微笑着挥手。
图片中哪些地方与提示不符？请用一句话回答。
"""


def train_tokenizer(extra_lines: list[str] = ()) -> Tokenizer:
    """BPE over CORPUS (x4) plus `extra_lines`.

    The toy model passes its world's captions and instructions, so each of its English words
    becomes one token instead of three or four pieces; such a tokenizer also splits Chinese
    into single characters first, or BPE would fuse whole phrases ("红色圆形", "背景是黑色") into
    tokens a model cannot recombine for colour/shape pairs it never saw together."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    per_character = [pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated")] if extra_lines else []
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(per_character + [
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[], show_progress=False)
    lines = [line for line in CORPUS.strip().splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines * 4 + list(extra_lines), trainer=trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def build(out: Path, extra_lines: list[str] = (), chat_template: str = CHAT_TEMPLATE) -> None:
    from transformers import Qwen2TokenizerFast

    tokenizer = train_tokenizer(extra_lines)
    wrapped = Qwen2TokenizerFast(
        tokenizer_object=tokenizer, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", model_max_length=131072, padding_side="right",
        chat_template=chat_template)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
