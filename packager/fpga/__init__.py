"""Compiling models for FPGAs: the HLS firmware path (hls4ml) and the open iCE40 path (our Verilog).

Each submodule is one stage the packager calls; none of them touches a board.
"""
