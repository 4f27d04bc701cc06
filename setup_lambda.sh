#!/usr/bin/env bash
# Set up a fresh cloud GPU VM (Lambda Labs or similar) to train: uv, an xkcd-style font
# for the loss chart, and the project's environment. Safe to run again: every step is
# skipped when its work is already done.
#
#     bash setup_lambda.sh
set -euo pipefail
cd "$(dirname "$0")"

XKCD_FONT_URL="https://github.com/ipython/xkcd-font/raw/master/xkcd-script/font/xkcd-script.ttf"
FONT_DIR="${XDG_DATA_HOME:-$HOME/.local/share}/fonts"

# Root needs no sudo (containers often have none); everyone else does for apt-get.
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

# 1. uv (https://docs.astral.sh/uv/), into ~/.local/bin.
if ! command -v uv >/dev/null 2>&1; then
    if [ -x "$HOME/.local/bin/uv" ]; then
        echo "uv: already in ~/.local/bin"
    else
        echo "uv: installing"
        curl -LsSf https://astral.sh/uv/install.sh | sh
    fi
    export PATH="$HOME/.local/bin:$PATH"
else
    echo "uv: already installed ($(command -v uv))"
fi

# 2. An xkcd-style font, so that the chart is drawn in xkcd style as the original's.
#    Debian/Ubuntu package Humor Sans (matplotlib's xkcd mode asks for it); the original
#    scripts used xkcd Script from the ipython/xkcd-font repository. We install both
#    where we can; either one is enough.
font_installed() {
    command -v fc-list >/dev/null 2>&1 && fc-list : family | grep -qiE "^(xkcd|xkcd script|humor sans)(,|$)"
}
if font_installed; then
    echo "font: an xkcd-style font is already installed"
else
    if command -v apt-get >/dev/null 2>&1; then
        echo "font: installing fonts-humor-sans and fontconfig"
        "${SUDO[@]}" apt-get update -qq || echo "font: apt-get update failed; trying the install anyway"
        "${SUDO[@]}" apt-get install -y -qq fonts-humor-sans fontconfig \
            || echo "font: apt-get could not install fonts-humor-sans"
    fi
    if [ ! -f "$FONT_DIR/xkcd-script.ttf" ]; then
        echo "font: downloading xkcd-script.ttf into $FONT_DIR"
        mkdir -p "$FONT_DIR"
        # Downloaded to a temporary name first: an interrupted download leaves no broken font.
        if curl -fsSL "$XKCD_FONT_URL" -o "$FONT_DIR/xkcd-script.ttf.part"; then
            mv "$FONT_DIR/xkcd-script.ttf.part" "$FONT_DIR/xkcd-script.ttf"
        else
            rm -f "$FONT_DIR/xkcd-script.ttf.part"
            echo "font: download failed; the chart will be drawn in the plain style"
        fi
    fi
    if command -v fc-cache >/dev/null 2>&1; then
        fc-cache -f >/dev/null
    fi
    # matplotlib keeps its own list of fonts; drop it so the new font is found.
    rm -f "${MPLCONFIGDIR:-$HOME/.cache/matplotlib}"/fontlist-*.json "$HOME"/.matplotlib/fontlist-*.json
fi

# 3. The project's environment (from uv.lock).
uv sync --compile-bytecode
echo "ready: try   uv run torchrun --nproc_per_node=\$(nvidia-smi -L | wc -l) ddp_train.py RUN ./datasets"
