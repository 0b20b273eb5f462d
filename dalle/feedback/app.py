"""The local web app where people compare samples: a compare page, a generate page and a stats page.

    /compare   the prompt and two samples of it, sides drawn at random for each view; keys 1 / 2 choose
               the left / right image, 3 a tie, 0 skips, u undoes the rater's last choice; progress shown
    /generate  a prompt in, the model's reranked candidates out with their scores (needs a pipeline)
    /stats     comparisons per rater, accuracy on gold pairs, agreement on pairs several raters judged

Flask with Jinja's autoescaping: prompt text and rater names are always escaped. Every choice is one
transaction of the store, so a killed server loses nothing that was acknowledged.
"""

from __future__ import annotations

import base64
import random
import threading
from pathlib import Path

from flask import Flask, Response, abort, redirect, render_template_string, request, url_for

from dalle.feedback.pairs import png_bytes
from dalle.feedback.store import CHOICES, Store

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{{ title }}</title><style>
body{font-family:sans-serif;margin:2em;max-width:60em} img{width:192px;height:192px;image-rendering:pixelated;
border:1px solid #ccc} .pair{display:flex;gap:2em} button{font-size:1.1em;margin:.3em} nav a{margin-right:1em}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.3em .6em}</style></head><body>
<nav><a href="{{ url_for('compare') }}">compare</a><a href="{{ url_for('generate_page') }}">generate</a>
<a href="{{ url_for('stats') }}">stats</a></nav>{% block body %}{% endblock %}</body></html>"""

COMPARE = PAGE.replace("{% block body %}{% endblock %}", """
<form method="get"><label>rater <input name="rater" id="rater" value="{{ rater }}"></label>
<button type="submit">set</button></form>
<p id="progress">{{ done }} of {{ total }} pairs judged by {{ rater }}</p>
{% if pair %}
<h2 id="prompt">{{ pair.prompt }}</h2>
<form method="post" id="choose"><input type="hidden" name="rater" value="{{ rater }}">
<input type="hidden" name="pair" value="{{ pair.id }}"><input type="hidden" name="left" value="{{ left }}">
<div class="pair"><div><img id="left" src="{{ url_for('image', sample_id=left) }}" data-sample="{{ left }}"><br>
<button name="choice" value="left" id="b1">1: left</button></div>
<div><img id="right" src="{{ url_for('image', sample_id=right) }}" data-sample="{{ right }}"><br>
<button name="choice" value="right" id="b2">2: right</button></div></div>
<button name="choice" value="tie" id="b3">3: tie</button><button name="choice" value="skip" id="b0">0: skip</button>
</form>
{% else %}<p id="done">Nothing left to compare.</p>{% endif %}
<form method="post" action="{{ url_for('undo') }}"><input type="hidden" name="rater" value="{{ rater }}">
<button id="undo">u: undo</button></form>
<script>
document.addEventListener("keydown", function (e) {
  if (e.target.tagName === "INPUT") return;
  var id = {"1": "b1", "2": "b2", "3": "b3", "0": "b0", "u": "undo"}[e.key];
  if (id && document.getElementById(id)) document.getElementById(id).click();
});
</script>""")

GENERATE = PAGE.replace("{% block body %}{% endblock %}", """
<form method="get"><input name="prompt" id="prompt-in" size="50" value="{{ prompt }}">
<button type="submit" id="go">generate</button></form>
{% if error %}<p id="error">{{ error }}</p>{% endif %}
{% if results %}<h2 id="prompt">{{ prompt }}</h2><div class="pair">{% for r in results %}
<div><img src="data:image/png;base64,{{ r.png }}"><br>
<span class="score">{{ "%.3f"|format(r.score) if r.score is not none else "no reranker" }}</span>
<span class="seed">seed {{ r.seed }}</span></div>{% endfor %}</div>{% endif %}""")

STATS = PAGE.replace("{% block body %}{% endblock %}", """
<p id="counts">{{ counts.prompts }} prompts, {{ counts.samples }} samples, {{ counts.pairs }} pairs,
{{ counts.comparisons }} comparisons</p>
<table id="raters"><tr><th>rater</th><th>comparisons</th><th>gold pairs</th><th>gold accuracy</th>
<th>shared judgements</th><th>agreement</th></tr>
{% for name, s in raters.items() %}<tr><td>{{ name }}</td><td>{{ s.comparisons }}</td><td>{{ s.gold_pairs }}</td>
<td>{{ "%.2f"|format(s.gold_accuracy) }}</td><td>{{ s.shared_judgements }}</td>
<td>{{ "%.2f"|format(s.agreement) }}</td></tr>{% endfor %}</table>""")


def create_app(store_path: str | Path, *, pipeline: object | None = None, keep: int = 4,
               candidates: int = 16) -> Flask:
    """The app over the store at `store_path`; `pipeline` (a dalle.pipeline.Pipeline) serves /generate."""
    app = Flask(__name__)
    Store(store_path).close()  # create the file and its tables now: a bad path fails at start, not per request
    local = threading.local()  # one connection per server thread: a connection holds one transaction at a time
    sides = random.SystemRandom()

    def the_store() -> Store:
        if not hasattr(local, "store"):
            local.store = Store(store_path)
        return local.store

    def rater_name() -> str:
        name = (request.values.get("rater") or request.cookies.get("rater") or "anonymous").strip()[:64]
        return name or "anonymous"

    @app.get("/")
    def index() -> Response:
        return redirect(url_for("compare"))

    @app.get("/compare")
    def compare() -> Response:
        rater = rater_name()
        pair_id = the_store().next_pair(rater)
        pair, left, right = None, None, None
        if pair_id is not None:
            pair = the_store().pair(pair_id)
            left, right = (pair["a_id"], pair["b_id"]) if sides.random() < 0.5 else (pair["b_id"], pair["a_id"])
        done = the_store().db.execute("SELECT COUNT(DISTINCT pair_id) FROM comparisons WHERE rater = ?",
                                (rater,)).fetchone()[0]
        page = render_template_string(COMPARE, title="compare", rater=rater, pair=pair, left=left, right=right,
                                      done=done, total=the_store().counts()["pairs"])
        response = Response(page)
        response.set_cookie("rater", rater, samesite="Strict")
        return response

    @app.post("/compare")
    def choose() -> Response:
        choice = request.form.get("choice", "")
        if choice not in CHOICES:
            abort(400, f"choice must be one of {CHOICES}")
        try:
            the_store().record(int(request.form["pair"]), int(request.form["left"]), choice, rater_name())
        except (KeyError, ValueError) as e:
            abort(400, str(e))
        return redirect(url_for("compare", rater=rater_name()))

    @app.post("/undo")
    def undo() -> Response:
        the_store().undo(rater_name())
        return redirect(url_for("compare", rater=rater_name()))

    @app.get("/image/<int:sample_id>.png")
    def image(sample_id: int) -> Response:
        try:
            return Response(the_store().png(sample_id), mimetype="image/png")
        except KeyError:
            abort(404)

    @app.get("/generate")
    def generate_page() -> str:
        prompt = request.args.get("prompt", "").strip()
        results, error = [], ""
        if prompt and pipeline is None:
            error = "this server was started without a model: pass --model to generate"
        elif prompt:
            from dalle.generation import generate

            n = candidates if getattr(pipeline, "reranker", None) is not None else keep
            for g in generate(pipeline, prompt, keep=keep, candidates=n):
                results.append({"png": base64.b64encode(png_bytes(g.image)).decode(), "score": g.score,
                                "seed": g.seed})
        return render_template_string(GENERATE, title="generate", prompt=prompt, results=results, error=error)

    @app.get("/stats")
    def stats() -> str:
        store = the_store()
        return render_template_string(STATS, title="stats", counts=store.counts(), raters=store.rater_stats())

    return app
