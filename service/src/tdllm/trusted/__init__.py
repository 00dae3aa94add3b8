"""The trusted side: private weights, audits and the one crossing. See README.md for the rules."""
