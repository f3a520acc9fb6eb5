"""Function calling after TinyAgent (Erdogan et al. 2024, arXiv:2409.00608): requests to a small set of tools,
each a JSON-schema'd function, with the one gold call that serves each request.

The tools are in the chat `tools` format (OpenAI's: {"type": "function", "function": {"name", "description",
"parameters": JSON Schema}}). Requests are drawn from templates x slot values (names, dates, times, places,
messages, durations), each slot said in several ways ("May 3, 2025", "3 May 2025", "2025-05-03"; "3:30pm",
"15:30", "half past three in the afternoon" is not used: every phrase maps to one exact argument).

An example is a chat: a system message listing the tools (one line each, so a small context holds it) and how
to answer, the user's request, and the assistant's call as text (`{"name": ..., "arguments": {...}}`, what
`call_schema` constrains a model to write). The records carry no `tools` field: templates that render one
(SmolLM2's) would add the full JSON schemas, ~1,100 tokens, to every prompt that the one-line signatures
already describe in ~230 (TinyAgent shortens its prompts for the same reason); the schemas are TOOLS. The call
is not repeated as `tool_calls`: a chat template that ignores them makes tinylm's renderer write them into the
content as well (tinylm.data.chat), and the model would learn to say the call twice.

A prediction is correct when it names the gold function with the gold arguments, compared as parsed JSON (key
order and spacing are irrelevant, a missing or extra argument is wrong). Requests are split by a hash of their
normalised text (`in_test_split`), so a held-out request never appears in training, whatever the seeds.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from tinylm.core.errors import TinylmError
from tinylm.data.tasks.split import in_test_split, normalise

DATE = {"type": "string", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", "description": "YYYY-MM-DD"}
TIME = {"type": "string", "pattern": r"^[0-9]{2}:[0-9]{2}$", "description": "24-hour HH:MM"}
TEXT = {"type": "string"}


def _tool(name: str, description: str, properties: dict[str, dict], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


TOOLS: list[dict[str, Any]] = [
    _tool("create_event", "Add an event to the calendar.",
          {"title": TEXT, "date": DATE, "time": TIME, "duration_minutes": {"type": "integer", "minimum": 1}},
          ["title", "date", "time"]),
    _tool("list_events", "List the calendar's events on a day.", {"date": DATE}, ["date"]),
    _tool("set_reminder", "Remind the user of something at a time (today unless a date is given).",
          {"text": TEXT, "time": TIME, "date": DATE}, ["text", "time"]),
    _tool("send_message", "Send a text message to a contact.", {"recipient": TEXT, "text": TEXT},
          ["recipient", "text"]),
    _tool("get_weather", "The weather forecast for a place (today unless a date is given).",
          {"location": TEXT, "date": DATE}, ["location"]),
    _tool("set_timer", "Start a countdown timer.", {"minutes": {"type": "integer", "minimum": 1}, "label": TEXT},
          ["minutes"]),
    _tool("set_alarm", "Set an alarm clock.", {"time": TIME}, ["time"]),
    _tool("lookup_contact", "Look up a contact's phone number, email or address.",
          {"name": TEXT, "field": {"type": "string", "enum": ["phone", "email", "address"]}}, ["name", "field"]),
]

# Each tool's request templates: (text with {slot}s, arguments fixed by the wording). A slot sets the argument
# of its name; an optional argument is in the gold call exactly when the template says it.
TEMPLATES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "create_event": [(t, {}) for t in (
        "Schedule {title} on {date} at {time}.", "Add {title} to my calendar for {date} at {time}.",
        "Put {title} on my calendar on {date} at {time} for {duration_minutes}.",
        "Can you create an event called {title} on {date} at {time}?",
        "Book {title} at {time} on {date}, it will take {duration_minutes}.",
        "I have {title} on {date} at {time}, please add it to my calendar.",
        "New calendar event: {title}, {date}, {time}, {duration_minutes}.")],
    "list_events": [(t, {}) for t in (
        "What's on my calendar on {date}?", "Show me my events for {date}.",
        "Do I have anything scheduled on {date}?", "List my appointments on {date}.",
        "What does my schedule look like on {date}?")],
    "set_reminder": [(t, {}) for t in (
        "Remind me to {text} at {time}.", "Remind me to {text} on {date} at {time}.",
        "Set a reminder to {text} at {time} on {date}.", "At {time} on {date}, remind me to {text}.",
        "Can you remind me at {time} to {text}?", "Don't let me forget to {text} on {date} at {time}.")],
    "send_message": [(t, {}) for t in (
        'Text {recipient} "{text}"', 'Send a message to {recipient} saying "{text}"',
        'Message {recipient}: "{text}"', 'Can you send {recipient} a text that says "{text}"?',
        'Send {recipient} this message: "{text}"', 'Tell {recipient} "{text}" by text.')],
    "get_weather": [(t, {}) for t in (
        "What's the weather in {location}?", "What's the weather like in {location} on {date}?",
        "Will it rain in {location} on {date}?", "Is it going to be sunny in {location} today?",
        "Give me the forecast for {location} on {date}.", "How hot will it be in {location} on {date}?",
        "Weather in {location}, please.")],
    "set_timer": [(t, {}) for t in (
        "Set a timer for {minutes}.", "Timer for {minutes}, please.", "Set a timer for {minutes} for the {label}.",
        "Count down {minutes}.", "Can you time {minutes} for the {label}?", "Start a timer: {minutes}.",
        "I need a {label} timer for {minutes}.")],
    "set_alarm": [(t, {}) for t in (
        "Wake me up at {time}.", "Set an alarm for {time}.", "Set my alarm to {time}.",
        "I need an alarm at {time}.", "Alarm at {time}, please.")],
    "lookup_contact": [
        ("What's {name}'s phone number?", {"field": "phone"}), ("Find {name}'s number.", {"field": "phone"}),
        ("Do I have a phone number for {name}?", {"field": "phone"}),
        ("What is {name}'s email address?", {"field": "email"}), ("Look up {name}'s email.", {"field": "email"}),
        ("Where does {name} live?", {"field": "address"}), ("Get me the address of {name}.", {"field": "address"})],
}

NAMES = ("Maria Tom Aisha Lucas Mei Omar Sofia James Priya Noah Elena Kenji Fatima David Grace Carlos Hana Ben "
         "Zara Ivan Chloe Mateo Amara Leo Yuki Samir Nora Felix Ines Hugo").split()
CITIES = ("Paris London Tokyo Berlin Madrid Rome Oslo Lisbon Cairo Lima Sydney Toronto Chicago Denver Boston "
          "Seattle Dublin Vienna Prague Warsaw Athens Nairobi Mumbai Seoul Bangkok Austin Miami Zurich").split()
TITLES = ("lunch with Maria", "yoga class", "piano lesson", "team meeting", "project review", "coffee with Tom",
          "dinner with my parents", "book club", "haircut", "soccer practice", "job interview", "study group",
          "birthday party", "car service", "swimming lesson", "doctor visit", "date night", "budget review",
          "parent meeting", "guitar lesson")
TASKS = ("call mom", "buy milk", "take out the trash", "water the plants", "pay the rent", "pick up the kids",
         "book a table", "send the report", "walk the dog", "feed the cat", "renew my passport", "call the plumber",
         "submit the form", "pack my bag", "charge my phone", "buy a birthday card", "return the library books",
         "drink some water", "check the oven", "stretch my legs")
MESSAGES = ("I'm running late", "See you at the park", "Happy birthday!", "Can you call me back?", "Dinner is ready",
            "I'll be home at six", "Thanks for your help", "Don't forget the keys", "The meeting moved to Friday",
            "Good luck today!", "Where are you?", "I'm on my way", "Let's get lunch tomorrow",
            "The package arrived", "Call me when you land", "Running ten minutes behind")
LABELS = ("pasta", "laundry", "eggs", "oven", "tea", "workout", "nap", "bread", "pizza", "homework")
MONTHS = ("January February March April May June July August September October November December").split()
HOURS = ("twelve one two three four five six seven eight nine ten eleven").split()


def _ordinal(day: int) -> str:
    return f"{day}{'th' if 10 <= day % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th')}"


def _date(rng: random.Random) -> tuple[str, str]:
    """(phrase, YYYY-MM-DD): a day of 2025 or 2026, said one of five ways."""
    year, month, day = rng.choice((2025, 2026)), rng.randrange(1, 13), rng.randrange(1, 29)
    name = MONTHS[month - 1]
    phrase = rng.choice((f"{name} {day}, {year}", f"{day} {name} {year}", f"{name} {_ordinal(day)}, {year}",
                         f"{year}-{month:02d}-{day:02d}", f"the {_ordinal(day)} of {name} {year}"))
    return phrase, f"{year}-{month:02d}-{day:02d}"


def _time(rng: random.Random) -> tuple[str, str]:
    """(phrase, HH:MM): a time between 06:00 and 22:45 on the quarter hour, said one of four ways."""
    hour, minute = rng.randrange(6, 23), rng.choice((0, 15, 30, 45))
    h12, ampm = hour % 12 or 12, "am" if hour < 12 else "pm"
    clock = f"{h12}" if minute == 0 else f"{h12}:{minute:02d}"
    part = "in the morning" if hour < 12 else "in the afternoon" if hour < 18 else "in the evening"
    options = [f"{clock}{ampm}", f"{clock} {ampm}", f"{hour:02d}:{minute:02d}"]
    if hour != 12:
        options.append(f"{clock} {part}")
    return rng.choice(options), f"{hour:02d}:{minute:02d}"


def _minutes(rng: random.Random) -> tuple[str, int]:
    """(phrase, minutes): a duration said in minutes, hours, or both."""
    kind = rng.randrange(4)
    if kind == 0:
        m = rng.choice((1, 2, 3, 5, 7, 10, 12, 15, 20, 25, 30, 40, 45, 50))
        return f"{m} minute{'s' * (m != 1)}", m
    if kind == 1:
        return rng.choice((("half an hour", 30), ("an hour", 60), ("a quarter of an hour", 15),
                           ("an hour and a half", 90), ("two hours", 120)))
    h, m = rng.randrange(1, 4), rng.choice((15, 30, 45))
    return f"{h} hour{'s' * (h != 1)} and {m} minutes", 60 * h + m


def _slots(rng: random.Random) -> dict[str, tuple[str, Any]]:
    """One drawn value for every slot: {slot: (what the request says, the argument)}."""
    date, time, minutes = _date(rng), _time(rng), _minutes(rng)
    text = rng.choice(TASKS), rng.choice(MESSAGES)
    name, city, title, label = rng.choice(NAMES), rng.choice(CITIES), rng.choice(TITLES), rng.choice(LABELS)
    return {"date": date, "time": time, "minutes": minutes, "duration_minutes": minutes,
            "text": (text[0], text[0]) if rng.random() < 0.5 else (text[1], text[1]), "recipient": (name, name),
            "name": (name, name), "location": (city, city), "title": (title, title), "label": (label, label)}


def draw_request(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """A user request and its gold call {"name": tool, "arguments": {...}} (arguments in the schema's order).

    Args:
        rng: the random source.
    """
    tool = rng.choice(TOOLS)["function"]
    name = tool["name"]
    template, fixed = rng.choice(TEMPLATES[name])
    slots = _slots(rng)
    if name == "set_reminder":
        slots["text"] = (rng.choice(TASKS),) * 2  # a reminder's text is a task, not a message
    used = set(re.findall(r"\{(\w+)\}", template))
    request = template.format(**{k: slots[k][0] for k in used})
    args = {k: (fixed[k] if k in fixed else slots[k][1]) for k in tool["parameters"]["properties"]
            if k in fixed or k in used}
    return request, {"name": name, "arguments": args}


def call_text(call: dict[str, Any]) -> str:
    """A call as the assistant writes it: {"name": ..., "arguments": {...}} on one line."""
    return json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)


def _signature(tool: dict[str, Any]) -> str:
    params = tool["parameters"]
    args = [f"{k}{'' if k in params['required'] else '?'}: {v.get('description', v['type'])}"
            + (f" ({'|'.join(v['enum'])})" if "enum" in v else "") for k, v in params["properties"].items()]
    return f"{tool['name']}({', '.join(args)}): {tool['description']}"


SYSTEM = ("You call functions for the user. Answer with one JSON object {\"name\": function, \"arguments\": "
          "{...}} and nothing else. Functions:\n" + "\n".join(_signature(t["function"]) for t in TOOLS))


def example(request: str, call: dict[str, Any]) -> dict[str, Any]:
    """The chat record of one request: system (the tools), user (the request), assistant (the call)."""
    assistant = {"role": "assistant", "content": call_text(call)}
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": request}, assistant]}


def wrong_call(call: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], str]:
    """A call that differs from `call` in one argument's value, for preference pairs: (call, reason)."""
    key = rng.choice(sorted(call["arguments"]))
    while True:
        slots = _slots(rng)
        value = rng.choice(["phone", "email", "address"]) if key == "field" else slots[key][1]
        if value != call["arguments"][key]:
            return {"name": call["name"], "arguments": {**call["arguments"], key: value}}, f"wrong argument: {key}"


def examples(n: int, split: str = "train", seed: int = 0, pairs: bool = False) -> list[dict[str, Any]]:
    """`n` distinct requests of one split, the same for the same seed.

    Args:
        n: how many.
        split: "train" or "test" (disjoint by normalised request text: see `in_test_split`).
        seed: the seed of the requests.
        pairs: preference pairs ({"prompt": system + user, "chosen", "rejected": one wrong argument value,
            "reason"}) instead of SFT chats ({"messages"}).
    """
    rng, out, seen = random.Random(seed), [], set()
    for _ in range(200 * n + 10_000):  # the space holds millions of requests; this bound is never reached
        request, call = draw_request(rng)
        key = normalise(request)
        if in_test_split(request) != (split == "test") or key in seen:
            continue
        seen.add(key)
        record = example(request, call)
        if pairs:
            bad, reason = wrong_call(call, rng)
            rejected = example(request, bad)["messages"][-1]
            record = {"prompt": record["messages"][:2], "chosen": record["messages"][2:], "rejected": [rejected],
                      "reason": reason}
        out.append(record)
        if len(out) == n:
            return out
    raise TinylmError(f"only {len(out)} distinct {split} requests found in {200 * n + 10_000} draws; ask for fewer")


# ----- checking --------------------------------------------------------------------------------------

def call_schema(tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A JSON Schema that admits exactly the valid calls of `tools` (default TOOLS), as {"name", "arguments"}:
    what `--json-schema` constrains a model's answer to.

    Args:
        tools: tools in the chat `tools` format.
    """
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                        "arguments": t["function"]["parameters"]},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for t in tools or TOOLS]}


def _as_call(obj: Any) -> dict[str, Any] | None:
    """{"name", "arguments" (a dict)} from a call in any of the usual shapes, or None."""
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):  # OpenAI tool_calls item
        obj = obj["function"]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else None


def parse_calls(prediction: Any) -> list[dict[str, Any]] | None:
    """The calls in a prediction, or None if it holds none.

    Args:
        prediction: the model's text (a JSON call, a list of calls, or {"tool_calls": [...]}, optionally in a
            ``` fence), or the same already parsed, or an assistant message (its `tool_calls`, else its
            content).
    """
    if isinstance(prediction, dict) and "role" in prediction and not prediction.get("tool_calls"):
        prediction = prediction.get("content") or ""
    if isinstance(prediction, str):
        text = re.sub(r"^```(?:json)?\s*|\s*```$", "", prediction.strip())
        try:
            prediction = json.loads(text)
        except json.JSONDecodeError:
            return None
    if isinstance(prediction, dict) and isinstance(prediction.get("tool_calls"), list):
        prediction = prediction["tool_calls"]
    items = prediction if isinstance(prediction, list) else [prediction]
    calls = [_as_call(item) for item in items]
    return calls if calls and all(calls) else None


def gold_calls(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The gold calls of an example written by `examples` (its last assistant message, or its tool_calls)."""
    return parse_calls(record["messages"][-1]) or []


def matches(gold: list[dict[str, Any]], prediction: Any) -> tuple[bool, list[str]]:
    """Exact match of a prediction with the gold calls: the same functions, in order, with equal arguments
    (parsed JSON: key order and spacing do not matter; a missing, extra or different argument does).

    Args:
        gold: the gold calls, {"name", "arguments"} each.
        prediction: what `parse_calls` accepts.

    Returns:
        (True, []) or (False, reasons): "not a function call", "N calls, expected M", "wrong function: X,
        expected Y", "wrong arguments for X: {...}".
    """
    calls = parse_calls(prediction)
    if calls is None:
        return False, ["not a function call"]
    if len(calls) != len(gold):
        return False, [f"{len(calls)} calls, expected {len(gold)}"]
    reasons = []
    for got, want in zip(calls, gold):
        if got["name"] != want["name"]:
            reasons.append(f"wrong function: {got['name']}, expected {want['name']}")
        elif _canonical(got["arguments"]) != _canonical(want["arguments"]):
            reasons.append(f"wrong arguments for {got['name']}: {json.dumps(got['arguments'])}")
    return not reasons, reasons


def _canonical(value: Any) -> str:
    """JSON with sorted keys: equal for equal values whatever the key order, and 1, 1.0 and true stay apart."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)
