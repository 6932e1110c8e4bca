"""The enrollment service: who the peer is (`identity`), what it may do (`authorization`), how fast (`budgets`),
what happens when it does (`enrollment`), and its CoAP resources (`resources`, `problems`).
"""
