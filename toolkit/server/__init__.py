"""The OpenAI-compatible HTTP layer: protocol models, errors, serving logic and routes, kept apart.

May import engine, chat, schema, images, adapters and base; never imports train.
"""
