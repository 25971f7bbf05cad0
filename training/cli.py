"""``python -m training COMMAND ...``: the pack's training jobs.

    python -m training finetune --data DIR --checkpoint SD15.safetensors --output OUT [...]   # artist LoRA / full
    python -m training caption DIR --model BLIP_FOLDER [--clip-filter --clip-weights W]      # machine captions
    python -m training wikiart-csv WIKIART_CSV_DIR --output meta.csv                          # genres for WikiArt

``python -m training finetune --help`` lists every option (docs/training.md explains them).
"""
import sys

COMMANDS = {
    "finetune": ("finetune_artist", "fine-tune SD 1.x on paintings: one artist or all of WikiArt (LoRA or full)"),
    "caption": ("caption", "write machine captions (.txt) for a folder of images with a local BLIP/GIT model"),
    "wikiart-csv": ("wikiart", "turn WikiArt's own class CSVs (genre, style, artist) into a --metadata-file"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        known = "\n".join(f"  {name:12s} {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: python -m training COMMAND [options]\n\ncommands:\n{known}", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    import importlib

    module = importlib.import_module(f".{COMMANDS[argv[0]][0]}", __package__)
    return module.main(argv[1:])
