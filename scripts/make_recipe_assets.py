"""Draw the example recipes' input images (recipes/assets/*.png) with Pillow.

Our own flat-colour drawings: a character seen from the front and the side (references for a
series) and two scenes (inputs for an edit campaign). Flat colours keep each PNG a few KB; the
short side is 512 px or more, the size OmniGen2 wants from an input. The toy_*.png files are
toy-world images at 64 px (omnigen2_batch/toy), inputs of recipes/quickstart.yaml on the toy model.

    python scripts/make_recipe_assets.py [OUT_DIR]   # default: recipes/assets
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, from a checkout
from omnigen2_batch.toy.characters import Character, CharacterScene, render_characters  # noqa: E402
from omnigen2_batch.toy.scenes import Scene, ShapeObject, render  # noqa: E402

SKIN, HAIR, SCARF, COAT = (240, 200, 170), (90, 50, 30), (200, 30, 40), (40, 70, 140)
SKY, GRASS = (170, 210, 240), (90, 170, 80)


def character(facing_side: bool) -> Image.Image:
    """Mira: brown hair, red scarf, blue coat; front view, or turned to the right."""
    image = Image.new("RGB", (512, 640), (245, 240, 230))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((156, 330, 356, 620), radius=40, fill=COAT)  # coat
    draw.rectangle((176, 300, 336, 345), fill=SCARF)  # scarf
    if facing_side:
        draw.ellipse((186, 120, 346, 310), fill=SKIN)
        draw.pieslice((176, 100, 336, 300), 120, 300, fill=HAIR)  # hair at the back of the head
        draw.ellipse((300, 190, 316, 206), fill=(30, 30, 30))  # one eye
        draw.polygon([(344, 215), (362, 240), (342, 245)], fill=SKIN)  # nose
    else:
        draw.ellipse((166, 120, 346, 310), fill=SKIN)
        draw.chord((156, 100, 356, 260), 180, 360, fill=HAIR)  # fringe
        for x in (214, 282):
            draw.ellipse((x, 200, x + 18, 218), fill=(30, 30, 30))
        draw.arc((226, 235, 286, 275), 20, 160, fill=(150, 60, 60), width=5)  # smile
    return image


def scene_house() -> Image.Image:
    image = Image.new("RGB", (768, 512), SKY)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 380, 768, 512), fill=GRASS)
    draw.ellipse((600, 50, 690, 140), fill=(250, 220, 60))  # sun
    draw.rectangle((220, 230, 480, 400), fill=(230, 220, 200))  # walls
    draw.polygon([(200, 235), (350, 120), (500, 235)], fill=(160, 60, 50))  # roof
    draw.rectangle((320, 310, 370, 400), fill=(110, 70, 40))  # door
    draw.rectangle((250, 260, 300, 300), fill=(120, 170, 220))  # window
    return image


def scene_car() -> Image.Image:
    image = Image.new("RGB", (768, 512), SKY)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 360, 768, 512), fill=(120, 120, 125))  # road
    draw.rectangle((0, 420, 768, 428), fill=(240, 240, 240))  # lane marking
    draw.rounded_rectangle((180, 250, 590, 380), radius=30, fill=(40, 120, 200))  # body
    draw.polygon([(270, 250), (330, 180), (470, 180), (520, 250)], fill=(40, 120, 200))  # cabin
    draw.polygon([(290, 250), (338, 195), (395, 195), (395, 250)], fill=(200, 230, 250))
    for x in (240, 470):
        draw.ellipse((x, 340, x + 80, 420), fill=(30, 30, 30))  # wheels
    return image


def leo() -> Image.Image:
    """Leo: a boy with black hair, a yellow shirt and green trousers."""
    image = Image.new("RGB", (512, 640), (235, 240, 245))
    draw = ImageDraw.Draw(image)
    draw.rectangle((196, 470, 316, 620), fill=(40, 120, 60))  # trousers
    draw.rounded_rectangle((166, 320, 346, 480), radius=30, fill=(240, 200, 40))  # shirt
    draw.ellipse((176, 130, 336, 310), fill=(225, 180, 140))
    draw.chord((166, 110, 346, 250), 180, 360, fill=(20, 20, 25))  # hair
    for x in (218, 278):
        draw.ellipse((x, 205, x + 16, 221), fill=(30, 30, 30))
    return image


def dog() -> Image.Image:
    """A brown dog with a white muzzle, seen from the side."""
    image = Image.new("RGB", (640, 512), (240, 235, 225))
    draw = ImageDraw.Draw(image)
    brown = (150, 95, 50)
    draw.rounded_rectangle((150, 220, 470, 360), radius=60, fill=brown)  # body
    for x in (180, 250, 380, 440):
        draw.rectangle((x, 340, x + 30, 450), fill=brown)  # legs
    draw.ellipse((420, 130, 560, 260), fill=brown)  # head
    draw.ellipse((500, 190, 580, 250), fill=(245, 245, 240))  # muzzle
    draw.polygon([(430, 140), (455, 70), (480, 145)], fill=(110, 65, 35))  # ear
    draw.line((150, 240, 90, 180), fill=brown, width=18)  # tail
    return image


def ball() -> Image.Image:
    """A red and white beach ball: an object to hand a shot as an extra image."""
    image = Image.new("RGB", (512, 512), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.ellipse((96, 96, 416, 416), fill=(220, 40, 40))
    draw.pieslice((96, 96, 416, 416), 60, 120, fill=(250, 250, 250))
    draw.pieslice((96, 96, 416, 416), 240, 300, fill=(250, 250, 250))
    return image


def toy_pip() -> Image.Image:
    """Pip, a toy-world sprite: red body, white stripes, yellow hat; alone, on blue."""
    pip = Character("red", "stripes", "white", "hat", "yellow")
    return render_characters(CharacterScene("blue", ((pip, "centre"),)))


def toy_circle() -> Image.Image:
    """A toy-world scene to edit: a large red circle in the centre of a blue background."""
    return render(Scene("blue", (ShapeObject("red", "circle", "centre", "large"),)))


ASSETS = {
    "mira_front.png": lambda: character(facing_side=False),
    "mira_side.png": lambda: character(facing_side=True),
    "scene_house.png": scene_house,
    "scene_car.png": scene_car,
    "leo.png": leo,
    "dog.png": dog,
    "ball.png": ball,
    "toy_pip.png": toy_pip,
    "toy_circle.png": toy_circle,
}


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, draw in ASSETS.items():
        draw().save(out_dir / name, optimize=True)
        print(f"{out_dir / name}: {(out_dir / name).stat().st_size} bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent.parent / "recipes" / "assets")
