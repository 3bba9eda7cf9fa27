#!/usr/bin/env bash
# System packages the tests and the demo use, installed when missing (idempotent; needs root for apt,
# otherwise it says what to install):
#   mosquitto                         the MQTT broker of the fleet tests
#   rabbitmq-server                   RabbitMQ's MQTT plugin, a second real broker (tests/e2e/test_brokers.py)
#   yosys nextpnr-ice40 fpga-icestorm the open iCE40 flow (synthesis, place and route, bitstream)
#   iverilog verilator g++            simulation of our Verilog, the HLS firmware's C simulation
#   chromium chromium-driver          the controller console's browser tests (headless, driven by Selenium)
set -euo pipefail
declare -A wanted=([mosquitto]=mosquitto [rabbitmq-server]=rabbitmq-server [yosys]=yosys [nextpnr-ice40]=nextpnr-ice40 [icepack]=fpga-icestorm
                   [iverilog]=iverilog [verilator]=verilator [g++]=g++
                   [chromium]=chromium [chromedriver]=chromium-driver)
missing=()
for tool in "${!wanted[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$tool" ]; then
    missing+=("${wanted[$tool]}")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (for the tests)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" $([[ " ${missing[*]} " == *" mosquitto "* ]] && echo mosquitto-clients) >/dev/null
else
  echo "warning: missing ${missing[*]}: install them (apt-get install ${missing[*]}) for the fleet and FPGA tests" >&2
fi
