#!/usr/bin/env bash
# Installs the optional Debian tools edgekiln uses when present (ARM cross-compiler for the
# microcontroller backend, qemu-system-arm to run it on an emulated Cortex-M for measure-mcu,
# valgrind for the generated C). Never fails the build: without root or apt these steps are
# skipped and the code that needs them says so.
set -u
need=()
command -v arm-none-eabi-gcc >/dev/null 2>&1 || need+=(gcc-arm-none-eabi libnewlib-arm-none-eabi)
command -v qemu-system-arm >/dev/null 2>&1 || need+=(qemu-system-arm)
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
# PostgreSQL server binaries: the fleet server's PostgreSQL tests start a throwaway cluster with them
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# Eclipse Mosquitto: the MQTT broker the push-notice and telemetry tests start on loopback
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: skipping ${need[*]} (needs root and apt-get)"
  exit 0
fi
echo "system-deps: installing ${need[*]}"
(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}") \
  >/tmp/edgekiln-system-deps.log 2>&1 || echo "system-deps: apt-get failed (see /tmp/edgekiln-system-deps.log); continuing"
exit 0
