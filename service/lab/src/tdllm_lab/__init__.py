"""tdllm-lab: the tools around the appliance that never ship in the TD image.

The attack suite (`attacks/`), every benchmark (`bench/`: the one `tdllm bench` group), the
protection tools (`protection/`: prepare, finetune-tail, protect --report, fidelity), the
sealing writer and key generation (`sealing/`), and the development appliance that runs a
simulated TD on one machine (`appliance.py`). The `tdllm` command finds these through the
`tdllm.commands` entry point (`cli.COMMANDS`); the image installs `tdllm` and `tdllm-attest`
only, so none of this code is in the measured image.
"""
