# Plots docs/scale/scale.tsv (written by the scale rig) into PNGs beside it.
# Run by scripts/scale.sh: gnuplot -e "dir='docs/scale'" docs/scale/plot.gp
if (!exists("dir")) dir = "docs/scale"
data = dir."/scale.tsv"
set terminal pngcairo size 900,560 font ",10"
set datafile separator "\t"
set key top left
set grid
# Blade curve: rows whose session count is the first one (the run's smallest);
# session curve: rows with the most blades.
stats data using 2 nooutput name "B"
stats data using 3 nooutput name "S"
bmax = B_max
smin = S_min
blades(store) = sprintf("< awk -F'\t' 'NR>1 && $1==\"%s\" && $3==%d' %s", store, smin, data)
sessions(store) = sprintf("< awk -F'\t' 'NR>1 && $1==\"%s\" && $2==%d' %s", store, bmax, data)

set output dir."/latency-vs-blades.png"
set title sprintf("Dispatch and ResolveToken latency as blades grow (%d sessions)", smin)
set xlabel "blades"; set ylabel "ms"
plot for [s in "ferretdb embedded"] blades(s) using 2:4 with linespoints title s." reconnect p50", \
     for [s in "ferretdb embedded"] blades(s) using 2:5 with linespoints dashtype 2 title s." reconnect p99", \
     for [s in "ferretdb embedded"] blades(s) using 2:7 with linespoints title s." new session p50", \
     for [s in "ferretdb embedded"] blades(s) using 2:9 with linespoints title s." ResolveToken p50"

set output dir."/latency-vs-sessions.png"
set title sprintf("Dispatch and ResolveToken latency as sessions grow (%d blades)", bmax)
set xlabel "live sessions"
plot for [s in "ferretdb embedded"] sessions(s) using 3:4 with linespoints title s." reconnect p50", \
     for [s in "ferretdb embedded"] sessions(s) using 3:5 with linespoints dashtype 2 title s." reconnect p99", \
     for [s in "ferretdb embedded"] sessions(s) using 3:7 with linespoints title s." new session p50", \
     for [s in "ferretdb embedded"] sessions(s) using 3:9 with linespoints title s." ResolveToken p50"

set output dir."/throughput-vs-sessions.png"
set title sprintf("Calls per second, 32 callers (%d blades)", bmax)
set ylabel "calls/s"; set logscale y
plot for [s in "ferretdb embedded"] sessions(s) using 3:6 with linespoints title s." reconnect Dispatch", \
     for [s in "ferretdb embedded"] sessions(s) using 3:11 with linespoints title s." ResolveToken", \
     for [s in "ferretdb embedded"] sessions(s) using 3:12 with linespoints title s." ws-proxy opens (sequential)"
unset logscale y

set output dir."/resources-vs-sessions.png"
set title sprintf("Memory and idle CPU (%d blades)", bmax)
set ylabel "MiB"; set y2label "idle CPU %"; set y2tics; set ytics nomirror
plot for [s in "ferretdb embedded"] sessions(s) using 3:14 with linespoints title s." dispatcher(s) RSS", \
     sessions("ferretdb") using 3:16 with linespoints title "FerretDB RSS", \
     for [s in "ferretdb embedded"] sessions(s) using 3:15 axes x1y2 with linespoints dashtype 2 title s." dispatcher(s) idle CPU", \
     sessions("ferretdb") using 3:17 axes x1y2 with linespoints dashtype 2 title "FerretDB idle CPU"
unset y2tics; unset y2label; set ytics mirror

set output dir."/resources-vs-blades.png"
set title sprintf("Memory and idle CPU as blades grow (%d sessions)", smin)
set xlabel "blades"; set ylabel "MiB"; set y2label "idle CPU %"; set y2tics; set ytics nomirror
plot for [s in "ferretdb embedded"] blades(s) using 2:14 with linespoints title s." dispatcher(s) RSS", \
     for [s in "ferretdb embedded"] blades(s) using 2:15 axes x1y2 with linespoints dashtype 2 title s." dispatcher(s) idle CPU", \
     blades("ferretdb") using 2:17 axes x1y2 with linespoints dashtype 2 title "FerretDB idle CPU"
