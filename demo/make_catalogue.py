"""Writes demo/catalogue.json: the demo store's products, made up from word lists with a fixed seed,
so every run writes the same bytes. `python3 demo/make_catalogue.py` (check: `--check`)."""

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "catalogue.json"
SEED = 13
COUNT = 300

# category -> (nouns, the price range in dollars, phrases about what it is for)
CATEGORIES = {
    "kitchen": (["kettle", "skillet", "chef's knife", "cutting board", "coffee grinder", "teapot", "mixing bowl set",
                 "saucepan", "french press", "spice rack"], (9, 140),
                ["for everyday cooking", "for slow weekend breakfasts", "for small apartment kitchens"]),
    "lighting": (["desk lamp", "floor lamp", "pendant light", "reading light", "string lights", "wall sconce",
                  "night light", "lantern"], (12, 220),
                 ["for late-night reading", "for a warm living room", "for a home office"]),
    "furniture": (["armchair", "bookshelf", "side table", "bar stool", "writing desk", "ottoman", "coat rack",
                   "bench"], (40, 650),
                  ["for compact living rooms", "for an entryway", "for a reading corner"]),
    "audio": (["wireless headphones", "bluetooth speaker", "turntable", "earbuds", "soundbar", "radio",
               "headphone stand"], (15, 480),
              ["for commuting", "for parties in the garden", "for focused work"]),
    "outdoor": (["tent", "sleeping bag", "camping stove", "hiking backpack", "water bottle", "folding chair",
                 "hammock", "headlamp"], (8, 390),
                ["for weekend hikes", "for cold nights outside", "for long trips"]),
    "office": (["notebook", "fountain pen", "monitor stand", "desk organizer", "ergonomic keyboard", "mouse pad",
                "paper tray", "stapler"], (4, 160),
               ["for tidy desks", "for long writing sessions", "for the home office"]),
    "garden": (["watering can", "pruning shears", "planter", "garden hose", "seed tray", "trowel", "bird feeder"],
               (5, 120),
               ["for balcony gardens", "for raised beds", "for spring planting"]),
    "toys": (["puzzle", "wooden train set", "kite", "building blocks", "plush bear", "board game", "yo-yo"],
             (6, 95),
             ["for rainy afternoons", "for family game night", "for curious kids"]),
}
ADJECTIVES = ["compact", "classic", "minimal", "sturdy", "lightweight", "vintage", "modern", "rustic", "quiet",
              "foldable", "portable", "handmade", "premium", "everyday", "oversized", "slim"]
MATERIALS = ["oak", "walnut", "bamboo", "stainless steel", "cast iron", "ceramic", "linen", "wool", "recycled plastic",
             "brass", "glass", "canvas", "aluminium", "cork"]
COLOURS = ["black", "white", "sage green", "navy", "terracotta", "charcoal", "mustard", "sand", "red", "sky blue"]
BRANDS = ["Northwind", "Fernhill", "Lumo", "Ashby & Co", "Kestrel", "Tidewater", "Orla", "Brightfold", "Hollis",
          "Marlow"]
FEATURES = ["easy to clean", "built to last for years", "ships flat and assembles in minutes", "backed by a two-year warranty",
            "made without glue or screws", "finished by hand", "sized to fit a small shelf", "rated for outdoor use",
            "gentle on surfaces", "designed to stack neatly"]


def product_id(index):
    """An Amazon-like id, `asin-B0` plus eight characters, fixed for each position."""
    digest = hashlib.sha256(f"demo-product-{index}".encode()).hexdigest().upper()
    return f"asin-B0{digest[:8]}"


def make_product(rng, index):
    category = rng.choice(sorted(CATEGORIES))
    nouns, (low, high), uses = CATEGORIES[category]
    noun = rng.choice(nouns)
    adjective, material, colour = rng.choice(ADJECTIVES), rng.choice(MATERIALS), rng.choice(COLOURS)
    brand = rng.choice(BRANDS)
    title = f"{brand} {adjective} {material} {noun}, {colour}"
    features = rng.sample(FEATURES, 2)
    article = "An" if adjective[0] in "aeiou" else "A"
    description = (f"{article} {adjective} {noun} in {colour} {material}, {rng.choice(uses)}. "
                   f"It is {features[0]} and {features[1]}.")
    price = rng.randint(low * 100, high * 100) // 100 * 100 + rng.choice([0, 49, 95, 99])
    return {"id": product_id(index), "title": title, "description": description,
            "price": round(price / 100, 2), "category": category}


def catalogue():
    rng = random.Random(SEED)
    return [make_product(rng, i) for i in range(COUNT)]


def render(products):
    # One product a line: small diffs, and still one JSON document.
    lines = [json.dumps(p, sort_keys=True, ensure_ascii=False) for p in products]
    return "[\n" + ",\n".join(lines) + "\n]\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if catalogue.json differs from what this writes")
    args = parser.parse_args()
    text = render(catalogue())
    if args.check:
        if OUT.read_text(encoding="utf-8") != text:
            sys.exit(f"{OUT} is not what make_catalogue.py writes: run python3 demo/make_catalogue.py")
        print(f"{OUT.name} is up to date ({COUNT} products)")
        return
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {COUNT} products to {OUT} ({len(text.encode())} bytes)")


if __name__ == "__main__":
    main()
