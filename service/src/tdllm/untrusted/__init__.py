"""The untrusted side: devices that run the public prefix. See README.md for the rules."""
