//+------------------------------------------------------------------+
//| ExportBars.mq5                                                   |
//| Script: writes a symbol's bar history as the CSV that Natron's   |
//| natron.data.load_ohlcv reads:                                    |
//|   time,open,high,low,close,volume,spread                         |
//|   2024-01-02 15:00:00,1.09412,1.09455,1.09390,1.09421,1534,0.00008 |
//| time = bar open time (MT5 server time, "YYYY-MM-DD HH:MM:SS"),   |
//| volume = tick volume (or real volume, see the input),            |
//| spread = the bar's spread in PRICE units (points * point size).  |
//| Oldest bar first; the still-forming bar is left out by default.  |
//| Times stay in server time (a fixed UTC offset cannot convert a   |
//| history that crosses DST changes): load them with data.tz, e.g.  |
//| --config.data.tz=EET for a UTC+2 winter / UTC+3 summer server.   |
//| Prices are written with the symbol's digits, so Natron infers    |
//| the point (or pass --config.data.point=<SYMBOL_POINT>).          |
//+------------------------------------------------------------------+
#property copyright   "Natron"
#property version     "1.00"
#property description "Exports bars to MQL5/Files/<name>.csv for Natron (time,open,high,low,close,volume,spread)."
#property script_show_inputs

input string          InpSymbol        = "";              // symbol ("" = the chart's)
input ENUM_TIMEFRAMES InpTimeframe     = PERIOD_CURRENT;  // timeframe
input int             InpBars          = 100000;          // number of closed bars (at most what the terminal has)
input string          InpFileName      = "";              // file name ("" = SYMBOL_TIMEFRAME.csv)
input bool            InpCommonFolder  = false;           // write to the common Files folder of all terminals
input bool            InpUseRealVolume = false;           // real volume instead of tick volume (0 for spot FX)
input bool            InpIncludeForming = false;          // also export the bar that is still forming

string IsoTime(const datetime t)
  {
   string s = TimeToString(t, TIME_DATE | TIME_SECONDS);   // "2024.01.02 15:00:00"
   StringReplace(s, ".", "-");                             // "2024-01-02 15:00:00"
   return s;
  }

string TimeframeName(const ENUM_TIMEFRAMES tf)
  {
   string s = EnumToString(tf);                            // "PERIOD_M15"
   StringReplace(s, "PERIOD_", "");
   return s;
  }

void OnStart()
  {
   string symbol = InpSymbol == "" ? _Symbol : InpSymbol;
   ENUM_TIMEFRAMES tf = InpTimeframe == PERIOD_CURRENT ? (ENUM_TIMEFRAMES)_Period : InpTimeframe;
   if(!SymbolSelect(symbol, true))
     {
      PrintFormat("ExportBars: unknown symbol %s", symbol);
      return;
     }
   int digits = (int)SymbolInfoInteger(symbol, SYMBOL_DIGITS);
   double point = SymbolInfoDouble(symbol, SYMBOL_POINT);
   MqlRates rates[];
   ArraySetAsSeries(rates, false);                         // oldest first
   int copied = CopyRates(symbol, tf, InpIncludeForming ? 0 : 1, InpBars, rates);
   if(copied <= 0)
     {
      PrintFormat("ExportBars: CopyRates(%s, %s) failed: error %d (open a chart to download history)", symbol,
                  TimeframeName(tf), GetLastError());
      return;
     }
   string name = InpFileName != "" ? InpFileName : symbol + "_" + TimeframeName(tf) + ".csv";
   int flags = FILE_WRITE | FILE_TXT | FILE_ANSI | (InpCommonFolder ? FILE_COMMON : 0);
   int handle = FileOpen(name, flags);
   if(handle == INVALID_HANDLE)
     {
      PrintFormat("ExportBars: cannot open %s for writing: error %d", name, GetLastError());
      return;
     }
   FileWriteString(handle, "time,open,high,low,close,volume,spread\n");
   for(int i = 0; i < copied; i++)
     {
      long volume = InpUseRealVolume ? rates[i].real_volume : rates[i].tick_volume;
      string line = IsoTime(rates[i].time) + "," +
                    DoubleToString(rates[i].open, digits) + "," +
                    DoubleToString(rates[i].high, digits) + "," +
                    DoubleToString(rates[i].low, digits) + "," +
                    DoubleToString(rates[i].close, digits) + "," +
                    IntegerToString(volume) + "," +
                    DoubleToString(rates[i].spread * point, digits) + "\n";
      FileWriteString(handle, line);
     }
   FileClose(handle);
   string folder = InpCommonFolder ? TerminalInfoString(TERMINAL_COMMONDATA_PATH)
                                   : TerminalInfoString(TERMINAL_DATA_PATH) + "\\MQL5";
   PrintFormat("ExportBars: wrote %d bars of %s %s (%s .. %s) to %s\\Files\\%s", copied, symbol, TimeframeName(tf),
               IsoTime(rates[0].time), IsoTime(rates[copied - 1].time), folder, name);
   long offset = (long)MathRound(((long)TimeTradeServer() - (long)TimeGMT()) / 900.0) * 900;
   PrintFormat("ExportBars: times are server time, now UTC%+.2f h: load with --config.data.tz=<the server's zone, "
               "e.g. EET for UTC+2/+3 with DST> (point %s, digits %d)", offset / 3600.0,
               DoubleToString(point, digits), digits);
  }
//+------------------------------------------------------------------+
