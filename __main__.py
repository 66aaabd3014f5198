"""CIRISBridge: load the stack config, build the bridge, export the outputs clients consume."""

import pulumi

from components import bridge, config

for name, value in bridge.build(config.from_engine()).outputs.items():
    pulumi.export(name, value)
