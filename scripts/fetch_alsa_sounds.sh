#!/bin/sh
# Real speech for the audio tests: Debian alsa-utils' voice clips (/usr/share/sounds/alsa/*.wav,
# a human voice saying "Front Center", "Side Left", ...; 48 kHz mono) copied into
# ${MMHUB_HOME:-~/.cache/mmhub}/alsa without installing the package and without root:
# `apt-get download` + `dpkg-deb -x`. On a machine whose apt lists are missing (a fresh
# container), the lists are fetched into a private temporary folder; the system's apt
# state is never changed. Idempotent: does nothing when the clips are already there.
set -eu

home="${MMHUB_HOME:-$HOME/.cache/mmhub}"
dest="$home/alsa"
if [ -f "$dest/Front_Center.wav" ] && [ -f "$dest/Side_Left.wav" ]; then
    exit 0
fi
mkdir -p "$home"
staging=$(mktemp -d "$home/.alsa.XXXXXX")
trap 'rm -rf "$staging"' EXIT INT TERM

if [ -f /usr/share/sounds/alsa/Front_Center.wav ]; then
    cp /usr/share/sounds/alsa/*.wav "$staging/"
else
    for tool in apt-get dpkg-deb; do
        command -v "$tool" >/dev/null 2>&1 || { echo "fetch_alsa_sounds: needs $tool (a Debian/Ubuntu machine)" >&2; exit 1; }
    done
    (
        cd "$staging"
        # apt-get runs downloads as the _apt user, which cannot write here: download as the caller
        quiet="-q -o APT::Sandbox::User=$(id -un)"
        if ! apt-get $quiet download alsa-utils >/dev/null 2>&1; then
            lists="$staging/apt"
            mkdir -p "$lists/lists/partial" "$lists/cache/archives/partial"
            private="-o Dir::State::Lists=$lists/lists -o Dir::Cache=$lists/cache -o Debug::NoLocking=1"
            apt-get $quiet $private update >/dev/null
            apt-get $quiet $private download alsa-utils >/dev/null
        fi
        dpkg-deb -x alsa-utils_*.deb unpacked
        mv unpacked/usr/share/sounds/alsa/*.wav .
        rm -rf unpacked apt alsa-utils_*.deb
    )
fi
[ -f "$staging/Front_Center.wav" ] || { echo "fetch_alsa_sounds: alsa-utils held no Front_Center.wav" >&2; exit 1; }
rm -rf "$dest"
chmod 755 "$staging"
mv "$staging" "$dest"   # atomic: the folder appears complete or not at all
trap - EXIT INT TERM
echo "fetch_alsa_sounds: $(ls "$dest" | wc -l) clips in $dest"
