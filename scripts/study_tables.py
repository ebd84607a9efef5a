#!/usr/bin/env python3
# Markdown tables of a study session, copied from its files: `scripts/study_tables.py rounds|controls|q1|times SESSION`.
import json, sys, os
def iv(d, k):
    v = d.get(k)
    if not v or v.get('value') is None: return '—'
    if v.get('lo') is None: return f"{v['value']:.3f}"
    return f"{v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"
def rounds_table(sess):
    pts = json.load(open(os.path.join(sess, 'rounds.json')))
    out = ["| round | status | authority | Δ authority vs prev | Δ authority vs base | care | p_ans_any | Δ p_ans_any vs base | ppx_json | json_is_valid | KL spent |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in pts:
        prev = iv(p.get('vs_prev', {}), 'authority')
        if p.get('prev') and prev != '—': prev += f" (vs {p['prev']})"
        out.append(f"| {p['round']} | {p['status']} | {iv(p['ci'],'authority')} | {prev} | {iv(p.get('vs_base',{}),'authority')} | {iv(p['ci'],'care')} | {iv(p['ci'],'p_ans_any')} | {iv(p.get('vs_base',{}),'p_ans_any')} | {iv(p['ci'],'ppx_json')} | {format(p['json_is_valid'], '.3f') if p.get('json_is_valid') is not None else '—'} | {p.get('kl_spent',0):.3f} |")
    return "\n".join(out)
def controls_table(sess):
    pts = json.load(open(os.path.join(sess, 'rounds.json')))
    out = ["| round | arm | authority | arm − round (authority) | steered − arm (authority) | care | p_ans_any |", "|---|---|---|---|---|---|---|"]
    for p in pts:
        for c in p.get('controls', []):
            out.append(f"| {p['round']} | {c['arm']} | {iv(c['ci'],'authority')} | {iv(c.get('vs_round',{}),'authority')} | {iv(c.get('steered_minus',{}),'authority')} | {iv(c['ci'],'care')} | {iv(c['ci'],'p_ans_any')} |")
    return "\n".join(out)
def q1_table(sess):
    out = ["| round | coherence before | coherence after | Δ coherence | persona strength before | after | Δ persona strength | prompts |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(os.listdir(sess)):
        f = os.path.join(sess, r, 'heal', 'gate-q1.json')
        if not r.startswith('round-') or not os.path.exists(f): continue
        g = json.load(open(f)); i = g.get('intervals') or {}
        def s(k):
            v = i.get(k)
            return f"{v['value']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" if v else '—'
        out.append(f"| {int(r[6:])} | {s('coherence_before')} | {s('coherence_after')} | {s('coherence_delta')} | {s('trait_before')} | {s('trait_after')} | {s('trait_delta')} | {i.get('prompts','—')} |")
    return "\n".join(out)
def stage_times(sess):
    import datetime
    ev = [json.loads(l) for l in open(os.path.join(sess, 'events.jsonl'))]
    t0 = None; last = None; rows = []
    for e in ev:
        t = datetime.datetime.fromisoformat(e['at'].replace('Z', '+00:00'))
        if t0 is None: t0 = t; last = t
        if e['kind'] == 'stage_done':
            rows.append((e['round'], e['stage'], (t - last).total_seconds())); last = t
    out = ["| round | stage | seconds |", "|---|---|---|"] + [f"| {r} | {s} | {x:.0f} |" for r, s, x in rows]
    out.append(f"| | **total (first event → last stage)** | **{(last - t0).total_seconds():.0f}** |")
    return "\n".join(out)
which = sys.argv[1]; sess = sys.argv[2]
print({'rounds': rounds_table, 'controls': controls_table, 'q1': q1_table, 'times': stage_times}[which](sess))
