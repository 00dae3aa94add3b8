#!/usr/bin/env bash
# Build the measured guest image: mmdebstrap -> Ansible over chroot -> ext4 -> dm-verity -> UKI
# -> signed reference values. One entry point (`make image`); every knob is in image/image.conf.
#
#   image/build.sh [--profile prod|dev|smoke] [--engine tdllm|vllm] [--out DIR]
#
# Artefacts land in DIR/<profile>/ (default image/out/<profile>/; DIR/<profile>-vllm/ with
# --engine vllm): uki.efi, vmlinuz, initrd.img, root.img (ext4 followed by its verity hash tree),
# cmdline.txt, packages.txt, python-packages.txt (+ vllm-packages.txt), reference-values.json
# (Ed25519-signed, naming the engine) and build.log. --engine vllm adds vLLM's venv
# (/opt/tdllm/vllm-venv, from service/vllm/requirements.txt) to the measured root. Needs root
# (chroot, bind mounts), the Debian packages of image/scripts/install-deps.sh and the tool venvs
# (`make venv ansible-tools`). Only deb.debian.org and the Python package index are contacted.
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=prod
ENGINE=tdllm
OUT="$REPO/image/out"
while (($#)); do
  case "$1" in
    --profile) PROFILE=${2:-}; shift 2 ;;
    --engine) ENGINE=${2:-}; shift 2 ;;
    --out) OUT=${2:-}; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see image/build.sh --help)" ;;
  esac
done
case "$PROFILE" in prod|dev|smoke) ;; *) die "profile must be prod, dev or smoke, not '$PROFILE'" ;; esac
case "$ENGINE" in tdllm|vllm) ;; *) die "engine must be tdllm or vllm, not '$ENGINE'" ;; esac
[[ $(id -u) -eq 0 ]] || die "the image build needs root (chroot and bind mounts)"

# shellcheck source=image.conf
. "$REPO/image/image.conf"
export SOURCE_DATE_EPOCH
PY="$REPO/.venv/bin/python"
ANSIBLE_PLAYBOOK="$REPO/ansible/.venv/bin/ansible-playbook"
STUB=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
[[ -x $PY ]] || die "missing $PY: run 'make venv' first"
[[ -x $ANSIBLE_PLAYBOOK ]] || die "missing $ANSIBLE_PLAYBOOK: run 'make ansible-tools' first"
for tool in mmdebstrap mke2fs veritysetup objcopy objdump debugfs; do
  command -v "$tool" >/dev/null || die "missing $tool: run image/scripts/install-deps.sh as root"
done
[[ -f $STUB ]] || die "missing $STUB: run image/scripts/install-deps.sh as root"

# The default engine keeps its old place; a vLLM image is another image, with its own digests.
NAME=$PROFILE
[[ $ENGINE == tdllm ]] || NAME="$PROFILE-$ENGINE"
DEST="$OUT/$NAME"
WORK="$OUT/.work-$NAME"
VLLM_VENV=/opt/tdllm/vllm-venv
ROOTFS="$WORK/rootfs"
umount_all() {
  local m
  for m in dev/pts dev proc sys; do
    mountpoint -q "$ROOTFS/$m" 2>/dev/null && umount -l "$ROOTFS/$m"
  done
  return 0
}
trap umount_all EXIT
umount_all
rm -rf "$WORK" "$DEST"
mkdir -p "$WORK" "$DEST"
started=$SECONDS

log "wheelhouse: tdllm, tdllm-attest and their pinned dependencies"
WHEELS="$WORK/wheelhouse"
# Build from a copy so that setuptools' build/ folders never land in the source tree.
mkdir -p "$WORK/src"
tar -C "$REPO" --exclude=build --exclude='*.egg-info' --exclude=__pycache__ -cf - attestation service \
  | tar -C "$WORK/src" -xf -
"$PY" -m pip --disable-pip-version-check wheel -q -w "$WHEELS" -c "$REPO/service/constraints.txt" \
  "$WORK/src/attestation" "$WORK/src/service"

# --engine vllm: a wheelhouse of its own (the service's venv resolves from $WHEELS, and vLLM
# pins other versions of shared packages): every pinned requirement as a wheel, --no-deps and
# binary only (nothing is built from an sdist), plus tdllm-vllm and our two wheels.
VLLM_WHEELS="$WORK/wheelhouse-vllm"
if [[ $ENGINE == vllm ]]; then
  log "wheelhouse for vLLM: service/vllm/requirements.txt (pinned, --no-deps) and tdllm-vllm"
  "$PY" -m pip --disable-pip-version-check download -q --no-deps --only-binary=:all: \
    -d "$VLLM_WHEELS" -r "$REPO/service/vllm/requirements.txt"
  "$PY" -m pip --disable-pip-version-check wheel -q --no-deps -w "$VLLM_WHEELS" "$WORK/src/service/vllm"
  cp "$WHEELS"/tdllm-*.whl "$WHEELS"/tdllm_attest-*.whl "$VLLM_WHEELS/"
  cp "$REPO/service/vllm/requirements.txt" "$VLLM_WHEELS/requirements.txt"
fi

log "root filesystem: mmdebstrap $IMAGE_SUITE (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
mmdebstrap --quiet --mode=root --variant=minbase --skip=cleanup/apt/lists \
  --include="systemd,systemd-sysv,udev,dbus,$IMAGE_KERNEL_PACKAGE,initramfs-tools,cryptsetup-bin,python3,python3-venv,python3-apt,python3-packaging" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  "$IMAGE_SUITE" "$ROOTFS" "$IMAGE_MIRROR"

log "pinned key broker: $IMAGE_BROKER_PUBLIC_KEY"
broker_pub="$REPO/$IMAGE_BROKER_PUBLIC_KEY"
[[ $IMAGE_BROKER_PUBLIC_KEY == /* ]] && broker_pub=$IMAGE_BROKER_PUBLIC_KEY
if [[ ! -f $broker_pub ]]; then
  [[ $broker_pub == *.pub.pem ]] || die "IMAGE_BROKER_PUBLIC_KEY must name a .pub.pem file"
  mkdir -p "$(dirname "$broker_pub")"
  "$REPO/.venv/bin/tdllm-broker" keygen --out "${broker_pub%.pub.pem}" >/dev/null
  echo "warning: created an UNSAFE development broker key pair ${broker_pub%.pub.pem}.{key,pub}.pem" >&2
fi
# As extra variables before the profile's, so that a profile may pin its own (smoke does).
"$PY" - "$broker_pub" "$WORK/broker-key.json" <<'PY' || die "$broker_pub is not an Ed25519 public key (PEM)"
import json, sys
from pathlib import Path
from tdllm_attest.broker.signing import load_broker_public_key
pem = Path(sys.argv[1]).read_bytes()
try:
    load_broker_public_key(pem)
except ValueError as exc:
    sys.exit(str(exc))
Path(sys.argv[2]).write_text(json.dumps({"tdllm_service_broker_public_key": pem.decode()}))
PY

log "provisioning: ansible-playbook image.yml over the chroot connection (profile $PROFILE, engine $ENGINE)"
for m in proc sys dev dev/pts; do mount --bind "/$m" "$ROOTFS/$m"; done
# Package scripts must not start services in the build chroot.
printf '#!/bin/sh\nexit 101\n' > "$ROOTFS/usr/sbin/policy-rc.d"
chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"
mkdir -p "$ROOTFS/tmp/wheelhouse"
cp "$WHEELS"/*.whl "$ROOTFS/tmp/wheelhouse/"
if [[ $ENGINE == vllm ]]; then
  mkdir -p "$ROOTFS/tmp/wheelhouse-vllm"
  cp "$VLLM_WHEELS"/* "$ROOTFS/tmp/wheelhouse-vllm/"
fi
ANSIBLE_CONFIG="$REPO/ansible/ansible.cfg" "$ANSIBLE_PLAYBOOK" \
  -i "$REPO/ansible/inventory/build-chroot.yml" \
  -e "ansible_host=$ROOTFS" -e "@$WORK/broker-key.json" -e "@$REPO/image/profiles/$PROFILE.yml" \
  -e "ml_runtime_wheelhouse=/tmp/wheelhouse" \
  -e "tdllm_image_engine=$ENGINE" -e "tdllm_image_vllm_venv=$VLLM_VENV" \
  -e "vllm_runtime_wheelhouse=/tmp/wheelhouse-vllm" \
  -e "tdllm_service_unit_src=$REPO/service/deploy/tdllm.service" \
  "$REPO/ansible/playbooks/image.yml" >"$WORK/ansible.log" 2>&1 \
  || { tail -40 "$WORK/ansible.log" >&2; die "ansible provisioning failed (log: $WORK/ansible.log)"; }
umount_all

log "manifests and cleanup"
dpkg-query --admindir="$ROOTFS/var/lib/dpkg" -W -f '${Package}\t${Version}\t${Architecture}\n' \
  | LC_ALL=C sort >"$DEST/packages.txt"
chroot "$ROOTFS" /opt/tdllm/venv/bin/python -m pip --disable-pip-version-check list \
  --format=freeze 2>/dev/null | LC_ALL=C sort >"$DEST/python-packages.txt"
if [[ $ENGINE == vllm ]]; then
  chroot "$ROOTFS" "$VLLM_VENV/bin/python" -m pip --disable-pip-version-check list \
    --format=freeze 2>/dev/null | LC_ALL=C sort >"$DEST/vllm-packages.txt"
fi
KVER=$(basename "$(ls -1 "$ROOTFS"/boot/vmlinuz-* | tail -1)" | sed 's/^vmlinuz-//')
cp "$ROOTFS/boot/vmlinuz-$KVER" "$DEST/vmlinuz"
cp "$ROOTFS/boot/initrd.img-$KVER" "$DEST/initrd.img"
# Everything that is per-build state rather than content: logs, caches, the build's own
# tools, machine identity (systemd creates a transient machine-id on the read-only root).
rm -rf "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/lib/apt/lists/* \
  "$ROOTFS"/var/log/* "$ROOTFS"/root/.ansible "$ROOTFS"/root/.cache "$ROOTFS"/usr/sbin/policy-rc.d \
  "$ROOTFS"/var/cache/ldconfig/aux-cache "$ROOTFS"/var/lib/dbus/machine-id \
  "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/var/lib/dpkg/*-old "$ROOTFS"/etc/*- \
  "$ROOTFS"/var/lib/systemd/catalog/database "$ROOTFS"/boot/*
: >"$ROOTFS/etc/machine-id"
# Clamp every timestamp so that mke2fs sees the same tree on every build.
find "$ROOTFS" -xdev -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH"

log "ext4 (fixed UUID, hash seed and time) and dm-verity (fixed salt and UUID)"
content_mb=$(du -sm --apparent-size "$ROOTFS" | cut -f1)
blocks=$(((content_mb * 12 / 10 + IMAGE_FS_SLACK_MB) * 256))  # 4 KiB blocks, 20% metadata room
IMG="$DEST/root.img"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mke2fs -q -F -t ext4 -b 4096 -I 256 -m 0 \
  -O ^has_journal -L "$IMAGE_FS_LABEL" -U "$IMAGE_FS_UUID" \
  -E "hash_seed=$IMAGE_FS_HASH_SEED,root_owner=0:0,lazy_itable_init=0,nodiscard" \
  -d "$ROOTFS" "$IMG" "$blocks" >/dev/null
# mke2fs -d copies each file's ctime (no tool can set it on the source tree) and atime (its own
# reads move it): pin both on every inode, at a fixed superblock write time.
if find "$ROOTFS" -xdev -name '*"*' -print -quit | grep -q .; then
  die "a path in the root filesystem contains a double quote (debugfs cannot name it)"
fi
{
  printf 'sif / ctime @%s\nsif / atime @%s\n' "$SOURCE_DATE_EPOCH" "$SOURCE_DATE_EPOCH"
  find "$ROOTFS" -xdev -mindepth 1 \
    -printf "sif \"/%P\" ctime @$SOURCE_DATE_EPOCH\nsif \"/%P\" atime @$SOURCE_DATE_EPOCH\n"
} >"$WORK/ctime.debugfs"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f "$WORK/ctime.debugfs" "$IMG" >"$WORK/ctime.log" 2>&1
if grep -v '^debugfs' "$WORK/ctime.log" | grep -q .; then
  grep -v '^debugfs' "$WORK/ctime.log" | head -5 >&2
  die "debugfs could not pin every ctime"
fi
hash_offset=$((blocks * 4096))
verity_out=$(veritysetup format "$IMG" "$IMG" --hash-offset="$hash_offset" --data-blocks="$blocks" \
  --hash=sha256 --data-block-size=4096 --hash-block-size=4096 \
  --salt="$IMAGE_VERITY_SALT" --uuid="$IMAGE_VERITY_UUID")
roothash=$(awk '/^Root hash:/ {print $3}' <<<"$verity_out")
[[ $roothash =~ ^[0-9a-f]{64}$ ]] || die "veritysetup printed no root hash"

cmdline="$IMAGE_CMDLINE"
[[ $PROFILE == prod ]] || cmdline+=" $IMAGE_CMDLINE_DEBUG"
cmdline+=" root=/dev/mapper/vroot rootfstype=ext4"
cmdline+=" tdllm.verity=/dev/vda,$blocks,$hash_offset,$roothash"
printf '%s' "$cmdline" >"$DEST/cmdline.txt"

log "UKI: systemd-stub + kernel + initrd + cmdline"
printf 'NAME="tdllm appliance"\nID=tdllm\nVERSION_ID=%s\nVARIANT_ID=%s\n' \
  "$IMAGE_SUITE" "$NAME" >"$WORK/os-release"
# Sections go after the stub's last one, each on a 4 KiB boundary (bash arithmetic: mawk
# has no hex parsing).
next=0
while read -r size vma; do
  end=$((0x$vma + 0x$size))
  ((end > next)) && next=$end
done < <(objdump -h -w "$STUB" | awk '$1 ~ /^[0-9]+$/ {print $3, $4}')
align() { echo $((($1 + 4095) / 4096 * 4096)); }
args=()
for section in osrel:"$WORK/os-release" cmdline:"$DEST/cmdline.txt" linux:"$DEST/vmlinuz" \
  initrd:"$DEST/initrd.img"; do
  name=${section%%:*} file=${section#*:}
  next=$(align "$next")
  args+=(--add-section ".$name=$file" --change-section-vma ".$name=$(printf '0x%x' "$next")")
  next=$((next + $(stat -c %s "$file")))
done
objcopy "${args[@]}" "$STUB" "$DEST/uki.efi"
# objcopy stamps the PE header with the current time: pin it, and zero the optional-header
# checksum that covers it (UEFI does not check it; the Authenticode digest skips it).
"$PY" - "$DEST/uki.efi" "$SOURCE_DATE_EPOCH" <<'PE'
import struct
import sys

path, epoch = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    pe = struct.unpack("<I", f.read(0x40)[0x3C:])[0]
    f.seek(pe)
    if f.read(4) != b"PE\0\0":
        sys.exit("error: uki.efi is not a PE image")
    f.seek(pe + 8)
    f.write(struct.pack("<I", epoch))
    f.seek(pe + 24 + 64)
    f.write(struct.pack("<I", 0))
PE

log "reference values (signed)"
key="$REPO/$IMAGE_SIGNING_KEY"
[[ $IMAGE_SIGNING_KEY == /* ]] && key=$IMAGE_SIGNING_KEY
"$PY" "$REPO/image/refvalues.py" sign --artefacts "$DEST" --profile "$PROFILE" --engine "$ENGINE" \
  --verity-root-hash "$roothash" --verity-salt "$IMAGE_VERITY_SALT" \
  --source-date-epoch "$SOURCE_DATE_EPOCH" --repo "$REPO" --key "$key" --create-dev-key \
  --out "$DEST/reference-values.json"
cp "$WORK/ansible.log" "$DEST/build.log"
rm -rf "$WORK"
log "done in $((SECONDS - started)) s: $DEST"
