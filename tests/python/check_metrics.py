"""Parses a Prometheus text exposition with the reference Python client's
parser; exits non-zero (with the parser's message) if it is malformed.
Prints the metric family names, one per line."""
import sys

from prometheus_client.parser import text_string_to_metric_families

text = open(sys.argv[1]).read()
for family in text_string_to_metric_families(text):
    print(family.name)
