#!/usr/bin/env bash
# System packages the tests and the demo use, installed when missing (idempotent):
# the Mosquitto MQTT broker. Needs root for apt; otherwise it says what to install.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing mosquitto (MQTT broker for the tests)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
else
  echo "warning: mosquitto is not installed; install it (apt-get install mosquitto) for the fleet tests" >&2
fi
