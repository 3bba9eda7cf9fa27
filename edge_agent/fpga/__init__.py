"""Device side of the FPGA path: simulators that answer with the firmware's own logic, and board loaders."""
