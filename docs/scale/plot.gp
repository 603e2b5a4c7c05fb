# Plots docs/scale/scale.tsv (written by the scale rig) into PNGs beside it.
# Run by scripts/scale.sh: gnuplot -e "dir='docs/scale'" docs/scale/plot.gp
if (!exists("dir")) dir = "docs/scale"
data = dir."/scale.tsv"
set terminal pngcairo size 900,560 font ",10"
set datafile separator "\t"
set key top left
set grid
# Each store's blade curve (its smallest session count) and session curve (its most blades).
if (!exists("src")) src = "docs/scale"
blades(store) = sprintf("< awk -v store=%s -v mode=blades -f %s/curve.awk %s", store, src, data)
sessions(store) = sprintf("< awk -v store=%s -v mode=sessions -f %s/curve.awk %s", store, src, data)

set logscale y
set output dir."/latency-vs-blades.png"
set title "Dispatch and ResolveToken latency as blades grow (each store at its first session count)"
set xlabel "blades"; set ylabel "ms (log)"
plot for [s in "ferretdb embedded"] blades(s) using 2:4 with linespoints title s." reconnect p50", \
     for [s in "ferretdb embedded"] blades(s) using 2:5 with linespoints dashtype 2 title s." reconnect p99", \
     for [s in "ferretdb embedded"] blades(s) using 2:7 with linespoints title s." new session p50", \
     for [s in "ferretdb embedded"] blades(s) using 2:9 with linespoints title s." ResolveToken p50"

set output dir."/latency-vs-sessions.png"
set title "Dispatch and ResolveToken latency as live sessions grow (all blades)"
set xlabel "live sessions"
plot for [s in "ferretdb embedded"] sessions(s) using 3:4 with linespoints title s." reconnect p50", \
     for [s in "ferretdb embedded"] sessions(s) using 3:5 with linespoints dashtype 2 title s." reconnect p99", \
     for [s in "ferretdb embedded"] sessions(s) using 3:7 with linespoints title s." new session p50", \
     for [s in "ferretdb embedded"] sessions(s) using 3:9 with linespoints title s." ResolveToken p50"

set output dir."/throughput-vs-sessions.png"
set title "Calls per second: 32 callers; ws-proxy opens one after the other (all blades)"
set ylabel "calls/s"
plot for [s in "ferretdb embedded"] sessions(s) using 3:6 with linespoints title s." reconnect Dispatch", \
     for [s in "ferretdb embedded"] sessions(s) using 3:11 with linespoints title s." ResolveToken", \
     for [s in "ferretdb embedded"] sessions(s) using 3:12 with linespoints title s." ws-proxy opens (sequential)"
unset logscale y

set output dir."/resources-vs-sessions.png"
set title "Memory and idle CPU as live sessions grow (all blades)"
set ylabel "MiB"; set y2label "idle CPU %"; set y2tics; set ytics nomirror
plot for [s in "ferretdb embedded"] sessions(s) using 3:14 with linespoints title s." dispatcher(s) RSS", \
     sessions("ferretdb") using 3:16 with linespoints title "FerretDB RSS", \
     for [s in "ferretdb embedded"] sessions(s) using 3:15 axes x1y2 with linespoints dashtype 2 title s." dispatcher(s) idle CPU", \
     sessions("ferretdb") using 3:17 axes x1y2 with linespoints dashtype 2 title "FerretDB idle CPU"
unset y2tics; unset y2label; set ytics mirror

set output dir."/resources-vs-blades.png"
set title "Memory and idle CPU as blades grow (each store at its first session count)"
set xlabel "blades"; set ylabel "MiB"; set y2label "idle CPU %"; set y2tics; set ytics nomirror
plot for [s in "ferretdb embedded"] blades(s) using 2:14 with linespoints title s." dispatcher(s) RSS", \
     for [s in "ferretdb embedded"] blades(s) using 2:15 axes x1y2 with linespoints dashtype 2 title s." dispatcher(s) idle CPU", \
     blades("ferretdb") using 2:17 axes x1y2 with linespoints dashtype 2 title "FerretDB idle CPU"
