#!/usr/bin/env bash
# Debian packages for the image work (run as root; idempotent, installs only what is missing).
#   install-deps.sh           the image build and its TCG smoke test (`make image-deps`)
#   install-deps.sh vagrant   vagrant + vagrant-libvirt, for `vagrant validate` in the fast tests
set -euo pipefail
case "${1:-build}" in
  build)
    packages=(
      mmdebstrap          # the Debian root filesystem, honouring SOURCE_DATE_EPOCH
      e2fsprogs           # mke2fs -d (ext4 from a directory, no loop device), debugfs
      cryptsetup-bin      # veritysetup
      systemd-boot-efi    # linuxx64.efi.stub for the UKI
      binutils            # objcopy assembles the UKI
      qemu-system-x86     # TCG smoke boot (never KVM on these machines)
      qemu-utils
      ovmf                # UEFI firmware for the TCG boot (TDVF on TDX hosts)
      socat               # guestfwd: the smoke guest reaches the host's broker and quote service
    ) ;;
  vagrant) packages=(vagrant vagrant-libvirt) ;;
  *) echo "error: unknown package set '$1' (build or vagrant)" >&2; exit 2 ;;
esac
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $(id -u) -eq 0 ]] || { echo "error: installing ${missing[*]} needs root" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
