import json, glob, statistics as S
for tag in ("A1","B1","A2","B2","A3","B3"):
    recs=[]
    for f in glob.glob(f"/var/tmp/ab2/{tag}/*/logs/runtime.log"):
        for line in open(f):
            r=json.loads(line)
            if r.get("msg","").startswith("restored from") and r.get("phases"):
                recs.append(r["phases"])
    keys=sorted({k for p in recs for k in p})
    creates=[int(l.split()[1])/1000 for l in open(f"calls-{tag}.txt") if l.startswith("create")]
    sums=[sum(v for k,v in p.items() if not k.startswith("criu_") ) * 1000 for p in recs]
    print(tag, "n", len(recs), "create med %.0f"%S.median(creates), "phase-sum med %.0f"%S.median(sums),
          " ".join("%s=%.1f"%(k,S.median([p.get(k,0) for p in recs])*1000) for k in keys))
