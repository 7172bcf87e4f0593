"""`logo-edge serve`: an OpenAI-compatible local server that routes every request (FastAPI + uvicorn).

    protocol.py  the wire format (pydantic)        app.py      handlers, errors, keys, limits
    workers.py   the engines and their queue        server.py   start-up from the command line
    static/      the chat page served at /
"""
