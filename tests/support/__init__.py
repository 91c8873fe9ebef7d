"""What tests share: waiting for a condition, inserting intents, providers with their
fakes, a hand-driven clock, payment flows, and the harnesses that run relays in-process."""
